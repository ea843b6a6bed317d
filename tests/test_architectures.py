"""Lossless on every architecture the README names, for every proposer.

Tiny float64 bases (tests/conftest.py TINY_ARCHS): Llama; Mistral, every layer a sliding window
smaller than the context; Qwen2, q/k/v biases and one full + one sliding layer; Gemma-2, logit
soft-capping after the head, sliding + full layers, eager attention. On each:
- greedy speculative == our vanilla loop == HF `generate`, and after every step the compacted KV
  cache equals a fresh prefill of the accepted tokens;
- under sampling, every tree node's logits equal HF's for that node's prefix, so rejection sampling
  (architecture-independent; chi-square tested in tests/test_sampling.py) draws from the base's own
  distribution; and end to end, the chi-square test on the base with logit post-processing.
"""

import logging

import pytest
import torch

from conftest import TINY_ARCHS, FirstArm, tiny_arch
from test_exactness import count_passes, passes_of
from test_sampling import PROMPT, V, chi2_critical, chi2_stat, exact_joint
from ctc_drafter.decoding import CTCDrafter
from ctc_drafter.models.kv_cache import new_kv_cache
from ctc_drafter.draft import new_draft_for
from ctc_drafter.errors import CTCDrafterError
from ctc_drafter.models.attention import attention_layout
from ctc_drafter.models.base import BaseModel

ARCHS = list(TINY_ARCHS)
PROPOSERS = [("ctc", "beam"), ("ctc", "medusa"), ("ctc", "prefix"), ("ngram", "beam"), ("hybrid", "beam")]
PROPOSER_IDS = ["beam", "medusa", "prefix", "ngram", "hybrid"]
# Gemma-2's RMSNorm computes in float32 even in a float64 model, so its passes over different
# shapes agree to float32 precision only.
TOL = {"gemma2": dict(rtol=1e-5, atol=1e-6)}
EXACT = dict(rtol=1e-9, atol=1e-9)


def drafter_for(base, proposer, generator, seed=0, budget=16):
    draft = None if proposer == "ngram" else new_draft_for(base, seed=seed)
    return CTCDrafter(base, draft, generator=generator, budget=budget, proposer=proposer, switch=FirstArm)


def hf_greedy(model, ids, n):
    out = model.generate(ids, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids))
    return out[0, ids.shape[1]:].tolist()


def check_kv_after_each_step(drafter, checked):
    """Wrap speculative_step: after it, the cache must equal a fresh prefill of context + accepted tokens."""
    base, step = drafter.base, drafter.speculative_step

    def spy(state, cache, *rest, **kw):
        context = list(state.tokens)  # prompt + tokens so far (the root last)
        new, hidden, n = step(state, cache, *rest, **kw)
        ref = new_kv_cache(base)
        # the bonus token is not cached yet; the class's forward: count_passes counts the loop's at base.forward
        type(base).forward(base, torch.tensor([context + new[:-1]]), ref)
        assert cache.get_seq_length() == ref.get_seq_length() == len(context) + len(new) - 1
        tol = TOL.get(base.config.model_type, EXACT)
        for a, b in zip(cache.layers, ref.layers, strict=True):
            torch.testing.assert_close(a.keys, b.keys, **tol)
            torch.testing.assert_close(a.values, b.values, **tol)
        checked.append(len(new))
        return new, hidden, n

    drafter.speculative_step = spy


@pytest.mark.parametrize("proposer,generator", PROPOSERS, ids=PROPOSER_IDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_speculative_equals_vanilla_equals_hf(arch, proposer, generator):
    model = tiny_arch(arch, seed=1)
    base = BaseModel(model, None, "toy")
    g = torch.Generator().manual_seed(3)
    checked = []
    calls = count_passes(base)
    for trial in range(2):
        drafter = drafter_for(base, proposer, generator, seed=trial)
        check_kv_after_each_step(drafter, checked)
        ids = torch.randint(0, 64, (1, 6 + 3 * trial), generator=g)
        spec, spec_passes = passes_of(calls, lambda: drafter.generate(ids, max_new_tokens=30))
        van, van_passes = passes_of(calls, lambda: drafter.generate(ids, max_new_tokens=30, speculative=False))
        assert spec.tokens == van.tokens == hf_greedy(model, ids, 30)
        assert sum(spec.accept_lengths) == 30 and (spec.steps, van.steps) == (spec_passes, van_passes)
        # a step that accepted draft tokens saved base passes, counted at the base itself
        assert (spec_passes < van_passes) == (max(spec.accept_lengths) > 1)
    window = base.attention_layout.window
    assert window is None or window < 6 + 30, "the context must outgrow the sliding window"
    assert max(checked) > 1, "no step accepted a draft token: compaction of a real path is untested"


@pytest.mark.parametrize("proposer,generator", PROPOSERS, ids=PROPOSER_IDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_tree_logits_are_the_base_distribution(arch, proposer, generator):
    """Sampling draws from the logits of the tree pass: at every node they must equal HF's own forward
    over the node's prefix (window, biases and logit post-processing included)."""
    model = tiny_arch(arch, seed=2)
    base = BaseModel(model, None, "toy")
    drafter = drafter_for(base, proposer, generator, seed=1, budget=8)
    forward, step, now, nodes = base.forward, drafter.speculative_step, {}, []

    def step_spy(state, *rest, **kw):
        now["context"] = list(state.tokens)  # prompt + tokens so far; all but the root are cached
        return step(state, *rest, **kw)

    def forward_spy(ids, cache, position_ids=None, attention_mask=None, logits_at=None):
        past = cache.get_seq_length()
        hidden, logits = forward(ids, cache, position_ids=position_ids, attention_mask=attention_mask,
                                 logits_at=logits_at)
        if attention_mask is not None:  # a tree pass
            prefix = now["context"][:-1]
            assert len(prefix) == past and ids[0, 0] == now["context"][-1]
            ancestors = attention_mask[0, 0, :, past:] == 0  # [n, n]
            for i in range(ids.shape[1]):
                path = ids[0, ancestors[i]].tolist()
                ref = model(torch.tensor([prefix + path])).logits[0, -1]
                torch.testing.assert_close(logits[0, i], ref, **TOL.get(arch, EXACT))
                nodes.append(len(path))
        return hidden, logits

    drafter.speculative_step, base.forward = step_spy, forward_spy
    for seed in range(2):
        ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(seed))
        drafter.generate(ids, max_new_tokens=16, temperature=1.0, seed=seed)
    assert nodes and max(nodes) > 1, "no tree had a draft node"


@pytest.mark.slow  # a chi-square test (~40 s); test_sampling's fast one covers sampling itself
def test_speculative_sampling_keeps_logit_post_processing(first_arm):
    """The chi-square test of tests/test_sampling.py, end to end, on the base whose distribution is not
    its head's output (Gemma-2 soft-capping); medusa tree: rejection over many siblings every step.
    The negative control is the same base without the capping, which the test must tell apart."""
    n = 1000
    model = tiny_arch("gemma2", vocab_size=V, seed=11)
    with torch.no_grad():
        model.lm_head.weight.mul_(16)  # raw logits well beyond the cap, so capping changes the distribution
        exact = exact_joint(model, 1.0, 0, 1.0)
    base = BaseModel(model, None, "toy")
    drafter = CTCDrafter(base, new_draft_for(base, seed=0), generator="medusa", budget=64, proposer="ctc",
                         switch=first_arm)
    counts, multi = {}, 0
    for i in range(n):
        r = drafter.generate(PROMPT, max_new_tokens=3, temperature=1.0, seed=i)
        counts[tuple(r.tokens)] = counts.get(tuple(r.tokens), 0) + 1
        multi += r.steps < 3
    assert multi > n // 4, "draft tokens were rarely accepted; rejection sampling would go untested"
    stat, dof = chi2_stat(counts, exact, n)
    assert stat < chi2_critical(dof), f"chi2 {stat:.1f} over {dof} dof"
    model.config.final_logit_softcapping = None
    with torch.no_grad():
        uncapped = exact_joint(model, 1.0, 0, 1.0)
    stat_w, dof_w = chi2_stat(counts, uncapped, n)
    assert stat_w > chi2_critical(dof_w), "negative control: the test cannot tell the uncapped distribution"


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_matches_the_models_own_outputs(arch):
    """BaseModel.forward: logits as the model's forward makes them (post-processing included), hidden
    states after the final norm, and logits only where asked."""
    model = tiny_arch(arch, seed=4)
    base = BaseModel(model, None, "toy")
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(0))
    ref = model(ids, output_hidden_states=True)
    hidden, logits = base.forward(ids, None)
    torch.testing.assert_close(logits, ref.logits, **EXACT)
    torch.testing.assert_close(hidden, ref.hidden_states[-1], **EXACT)
    torch.testing.assert_close(base.forward(ids, None, logits_at=slice(-1, None))[1], ref.logits[:, -1:])
    torch.testing.assert_close(base.forward(ids, None, logits_at=[2, 5])[1], ref.logits[:, [2, 5]])
    assert base.forward(ids, None, logits_at=slice(0, 0))[1].shape == (1, 0, 64)
    if arch == "gemma2":  # the capping is really there: |logits| < cap
        assert ref.logits.abs().max() < model.config.final_logit_softcapping


@pytest.mark.parametrize("arch,expected", [("llama", "sdpa"), ("gemma2", "eager")])
def test_attention_that_ignores_the_tree_mask_is_switched(arch, expected, caplog, first_arm):
    model = tiny_arch(arch, seed=5)
    model.set_attn_implementation("flex_attention")
    with caplog.at_level(logging.WARNING, logger="ctc_drafter.models.attention"):
        base = BaseModel(model, None, "toy")
    assert model.config._attn_implementation == expected
    assert "flex_attention" in caplog.text and expected in caplog.text
    ids = torch.tensor([[7, 3, 9, 9, 1, 4, 4]])
    drafter = CTCDrafter(base, new_draft_for(base, seed=2), generator="medusa", budget=64, proposer="ctc",
                         switch=first_arm)
    assert drafter.generate(ids, max_new_tokens=20).tokens == hf_greedy(model, ids, 20)


@pytest.mark.parametrize("layer_types,why", [
    (["full_attention", "chunked_attention"], "chunked attention"),
    (["full_attention", "linear_attention"], "LinearAttentionLayer"),
])
def test_unsupported_attention_layers_are_refused(layer_types, why):
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    cfg.layer_types = layer_types
    with pytest.raises(CTCDrafterError, match=why):
        attention_layout(cfg)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "gemma2"])  # Gemma-2 runs eager attention
def test_bf16_greedy_speculative_equals_hf_generate(arch):
    """bf16 on the CPU: tree passes attend node by node as 1-token steps do (sliding windows included),
    so greedy speculation is HF `generate` on the same bf16 model, token for token."""
    longest = 1
    for seed in range(6):  # with masked SDPA instead, Llama and Qwen2 differ from HF on one seed each
        model = tiny_arch(arch, hidden=64, dtype=torch.bfloat16, seed=seed)
        base = BaseModel(model, None, "toy")
        assert base.exact_tree
        drafter = drafter_for(base, "hybrid", "beam", seed=seed, budget=12)
        ids = torch.randint(0, 64, (1, 5 + seed), generator=torch.Generator().manual_seed(seed))
        spec = drafter.generate(ids, max_new_tokens=40)
        assert spec.tokens == hf_greedy(model, ids, 40)
        longest = max(longest, max(spec.accept_lengths))
    assert longest > 1, "no step accepted a draft token: the multi-token path is untested"
