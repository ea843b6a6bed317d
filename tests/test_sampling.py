"""Speculative sampling is lossless: the first tokens are distributed exactly as the base model's.

Tiny float64 Llama with an 8-token vocabulary; the Medusa tree then proposes nearly every token as a
child, so recursive rejection over siblings runs on every step. The exact joint distribution of the
first three tokens (512 cells) is computed from the base model; a chi-square test (alpha = 1e-4,
fixed seed) compares 2500 speculative samples with it, and the same test must reject a wrong
distribution (negative control: it has power).
"""

import itertools
import math

import pytest
import torch

from conftest import tiny_llama
from ctc_drafter.decoding import CTCDrafter
from ctc_drafter.decoding.verify import warp_probs
from ctc_drafter.draft import new_draft_for
from ctc_drafter.models.base import BaseModel

V, N = 8, 2500
PROMPT = [1, 5, 2]


def exact_joint(model, temperature, top_k, top_p, n_tok=3):
    joint = {}
    for seq in itertools.product(range(V), repeat=n_tok):
        p = 1.0
        for i in range(n_tok):
            logits = model(torch.tensor([PROMPT + list(seq[:i])])).logits[0, -1]
            p *= warp_probs(logits, temperature, top_k, top_p)[seq[i]].item()
            if p == 0:
                break
        joint[seq] = p
    return joint


def chi2_stat(counts, probs, n):
    """Chi-square over cells with expected >= 5 (rest pooled); returns (statistic, dof)."""
    stat, dof, pool_e, pool_o = 0.0, -1, 0.0, 0
    for k, p in probs.items():
        e, o = p * n, counts.get(k, 0)
        if e >= 5:
            stat += (o - e) ** 2 / e
            dof += 1
        else:
            pool_e += e
            pool_o += o
    if pool_e > 0:
        stat += (pool_o - pool_e) ** 2 / max(pool_e, 1e-12)
        dof += 1
    return stat, dof


def chi2_critical(dof, z=3.719):  # Wilson-Hilferty upper quantile, z for alpha = 1e-4
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


# ~45 s each: the fast tier keeps the hybrid with every warper (both proposers, temperature, top-k, top-p)
SLOW = pytest.mark.slow


@pytest.mark.parametrize("proposer,temperature,top_k,top_p", [
    pytest.param("ctc", 1.0, 0, 1.0, marks=SLOW), pytest.param("ctc", 0.7, 5, 0.9, marks=SLOW),
    pytest.param("ngram", 1.0, 0, 1.0, marks=SLOW), ("hybrid", 0.7, 5, 0.9)])
def test_speculative_sampling_matches_base_distribution(proposer, temperature, top_k, top_p):
    model = tiny_llama(vocab_size=V, seed=11)
    with torch.no_grad():
        model.lm_head.weight.mul_(4)  # sharper distributions: the draft's guesses get accepted often
        exact = exact_joint(model, temperature, top_k, top_p)
    assert sum(exact.values()) == pytest.approx(1.0)
    base = BaseModel(model, None, "toy")
    drafter = CTCDrafter(base, new_draft_for(base, seed=0), generator="medusa", budget=64, proposer=proposer)
    counts, multi = {}, 0
    for i in range(N):
        r = drafter.generate(PROMPT, max_new_tokens=3, temperature=temperature, top_k=top_k, top_p=top_p, seed=i)
        counts[tuple(r.tokens)] = counts.get(tuple(r.tokens), 0) + 1
        multi += r.steps < 3
    # n-gram lookup finds matches less often in 3 tokens; it must still be exercised
    assert multi > (N // 20 if proposer == "ngram" else N // 4), \
        f"draft tokens were rarely accepted ({multi}/{N}); the test would not exercise rejection sampling"
    stat, dof = chi2_stat(counts, exact, N)
    assert stat < chi2_critical(dof), f"chi2 {stat:.1f} over {dof} dof"
    # Negative control: the same samples against a slightly different distribution must fail.
    with torch.no_grad():
        wrong = exact_joint(model, temperature * 1.6, top_k, top_p)
    stat_w, dof_w = chi2_stat(counts, wrong, N)
    assert stat_w > chi2_critical(dof_w)


def test_sampling_on_the_static_engine_matches_the_base_distribution():
    """The compiled backends' layout (static cache, row attention, bucket padding, compaction): in float64
    without quantisation it is the HF model, so its speculative samples must follow the HF distribution."""
    from ctc_drafter.models.compiled_base import compile_base

    model = tiny_llama(vocab_size=V, seed=11)
    with torch.no_grad():
        model.lm_head.weight.mul_(4)
        exact = exact_joint(model, 0.7, 5, 0.9)
    base = compile_base(BaseModel(model, None, "toy"), "compiled-bf16", context=128, eager=True, dtype=torch.float64)
    drafter = CTCDrafter(base, new_draft_for(base, seed=0), generator="medusa", budget=16, proposer="hybrid")
    counts, multi = {}, 0
    for i in range(N):
        r = drafter.generate(PROMPT, max_new_tokens=3, temperature=0.7, top_k=5, top_p=0.9, seed=i)
        counts[tuple(r.tokens)] = counts.get(tuple(r.tokens), 0) + 1
        multi += r.steps < 3
    assert multi > N // 4, f"draft tokens were rarely accepted ({multi}/{N})"
    stat, dof = chi2_stat(counts, exact, N)
    assert stat < chi2_critical(dof), f"chi2 {stat:.1f} over {dof} dof"
    with torch.no_grad():
        wrong = exact_joint(model, 0.7 * 1.6, 5, 0.9)
    assert chi2_stat(counts, wrong, N)[0] > chi2_critical(chi2_stat(counts, wrong, N)[1])
