"""The batched decoding loop: greedy rows equal one-by-one greedy decoding; sampling is per-row seeded."""

from __future__ import annotations

import pytest
import torch

from ctc_drafter.data.batch_generation import Sampling, choose_next, generate_batch
from ctc_drafter.models.base import BaseModel

from conftest import tiny_llama

PAD = 63


@pytest.fixture(scope="module")
def toy():
    """float64 tiny Llama with an untied head (its greedy text varies), vocab 64."""
    return BaseModel(tiny_llama(), None, "toy")


def prompts_of_lengths(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 60, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(base, prompt, n, eos):
    """HF `generate`, one prompt alone (no padding), greedy."""
    out = base.model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=sorted(eos),
                              pad_token_id=PAD)
    new = out[0, len(prompt):].tolist()
    end = next((i for i, t in enumerate(new) if t in eos), None)
    return (new, False) if end is None else (new[: end + 1], True)


def frequent_tokens(base, prompts, n):
    """Tokens the base's greedy replies use: as end tokens they make rows end at different steps."""
    counts = torch.zeros(64, dtype=torch.long)
    for p in prompts:
        new, _ = hf_greedy(base, p, n, set())
        counts += torch.bincount(torch.tensor(new), minlength=64)
    return set(counts.argsort(descending=True)[:2].tolist())


def pairs(replies):
    return [(r.tokens, r.ended) for r in replies]


def test_batched_greedy_equals_unbatched_greedy_token_for_token(toy):
    prompts = prompts_of_lengths([3, 17, 8, 1, 30, 12, 5, 9])
    budgets = [12, 5, 20, 20, 1, 16, 20, 7]
    eos = frequent_tokens(toy, prompts, 20)
    got = pairs(generate_batch(toy, prompts, budgets, PAD, eos))
    want = [hf_greedy(toy, p, b, eos) for p, b in zip(prompts, budgets)]
    assert got == want
    # the case matters: some rows end on an end token early, others run to their budget
    assert any(e for _, e in got) and any(not e and len(r) == b for (r, e), b in zip(got, budgets))
    assert len({len(r) for r, _ in got}) > 2


def test_a_row_does_not_depend_on_its_batch(toy):
    prompts = prompts_of_lengths([4, 25, 11, 2], seed=3)
    alone = [pairs(generate_batch(toy, [p], [15], PAD, set()))[0] for p in prompts]
    assert pairs(generate_batch(toy, prompts, [15] * 4, PAD, set())) == alone


def test_sampling_follows_each_rows_seed_not_its_batch(toy):
    prompts = prompts_of_lengths([6, 6, 9], seed=4)
    s = Sampling(temperature=1.0, top_p=0.9)

    def run(ps, seeds):
        return pairs(generate_batch(toy, ps, [10] * len(ps), PAD, set(), s,
                                    [torch.Generator().manual_seed(x) for x in seeds]))

    together = run(prompts, [0, 1, 2])
    assert together == [run([p], [x])[0] for p, x in zip(prompts, [0, 1, 2])]
    assert together[0] != together[1]  # same length, other seed: another reply
    assert run(prompts[:1], [0]) == run(prompts[:1], [0])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_labels_are_the_greedy_targets_and_states_of_a_full_pass(toy, temperature):
    prompts = prompts_of_lengths([7, 2, 19], seed=5)
    budgets = [9, 14, 3]
    eos = frequent_tokens(toy, prompts, 14)
    gens = [torch.Generator().manual_seed(i) for i in range(3)] if temperature else None
    got = generate_batch(toy, prompts, budgets, PAD, eos, Sampling(temperature), gens, labels=True, keep_hidden=True)
    for p, r in zip(prompts, got):
        seq = torch.tensor([p + r.tokens])
        with torch.no_grad():
            ref_h = toy.model.model(seq).last_hidden_state[0]  # one unbatched pass, no cache
        assert torch.equal(r.targets, toy.model.lm_head(ref_h).argmax(-1))
        assert r.hidden.dtype == torch.float16 and r.hidden.shape == (seq.shape[1], 32)
        torch.testing.assert_close(r.hidden.double(), ref_h, atol=2e-3, rtol=2e-3)
        if not temperature:  # greedy: every reply token is the target of the position before it
            assert r.targets[len(p) - 1 : -1].tolist() == r.tokens


def test_top_p_sampling_stays_in_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = {int(choose_next(logits, Sampling(1.0, 0.7), [g])) for _ in range(300)}
    assert seen == {0, 1}  # 0.5 + 0.3 reaches 0.7; tokens 2 and 3 are outside
    counts = torch.bincount(torch.tensor([int(choose_next(logits, Sampling(1.0, 1.0), [g])) for _ in range(4000)]),
                            minlength=4)
    assert torch.allclose(counts / 4000, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)


def test_sampling_without_generators_is_refused(toy):
    with pytest.raises(ValueError):
        generate_batch(toy, [[1, 2]], [3], PAD, set(), Sampling(temperature=1.0))

