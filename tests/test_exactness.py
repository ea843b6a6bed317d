"""Lossless greedy decoding: speculative == our vanilla == HF generate, token for token."""

import pytest
import torch

from conftest import tiny_llama
from ctc_drafter.decoding import CTCDrafter
from ctc_drafter.draft import new_draft_for
from ctc_drafter.models.base import BaseModel


def count_passes(base) -> list[int]:
    """Make base.forward count its calls in the returned one-element list (an independent count of passes)."""
    calls, forward = [0], base.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    base.forward = counted
    return calls


def passes_of(calls: list[int], run):
    """(run's result, base passes it made)."""
    calls[0] = 0
    res = run()
    return res, calls[0]


def hf_greedy(model, ids, n):
    out = model.generate(ids, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids))
    return out[0, ids.shape[1]:].tolist()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("generator,budget", [("beam", 12), ("beam", 40), ("medusa", 64), ("medusa", 20),
                                              ("prefix", 4), ("prefix", 24)])
def test_speculative_equals_vanilla_equals_hf(dtype, generator, budget, first_arm):
    base = BaseModel(tiny_llama(dtype=dtype, seed=1), None, "toy")
    calls = count_passes(base)
    g = torch.Generator().manual_seed(budget)
    merged_tree_seen = False
    longest = 1
    for trial in range(4):
        draft = new_draft_for(base, seed=trial)
        drafter = CTCDrafter(base, draft, generator=generator, budget=budget, proposer="ctc", switch=first_arm)
        ids = torch.randint(0, 64, (1, int(torch.randint(1, 12, (), generator=g))), generator=g)
        n = 30
        spec, spec_passes = passes_of(calls, lambda: drafter.generate(ids, max_new_tokens=n))
        van, van_passes = passes_of(calls, lambda: drafter.generate(ids, max_new_tokens=n, speculative=False))
        assert spec.tokens == van.tokens == hf_greedy(base.model, ids, n)
        assert len(spec.tokens) == n and van.steps == van_passes == n and spec.steps == spec_passes
        assert sum(spec.accept_lengths) == n and len(spec.accept_lengths) == spec.steps
        # a step that accepted draft tokens saved base passes, counted at the base itself
        assert (spec_passes < van_passes) == (max(spec.accept_lengths) > 1)
        longest = max(longest, max(spec.accept_lengths))
        merged_tree_seen |= generator == "medusa" and any(t < min(budget, 64) for t in spec.tree_sizes)
    assert longest > 1, "no step accepted a draft token: the multi-token path is untested"
    if generator == "medusa":
        assert merged_tree_seen, "CTC-collapsed duplicate paths never merged"


def test_eos_and_max_new_tokens_match_hf(first_arm):
    model = tiny_llama(seed=3)
    base = BaseModel(model, None, "toy")
    ids = torch.tensor([[5, 9, 2, 7]])
    free = hf_greedy(model, ids, 40)
    eos = free[7]  # a token the model emits at position 7 (and maybe earlier)
    model.config.eos_token_id = eos
    model.generation_config.eos_token_id = eos
    drafter = CTCDrafter(base, new_draft_for(base, seed=0), generator="medusa", budget=64, proposer="ctc",
                         switch=first_arm)
    spec = drafter.generate(ids, max_new_tokens=40)
    ref = hf_greedy(model, ids, 40)
    assert spec.tokens == ref and spec.tokens[-1] == eos and spec.stop_reason == "eos"
    assert drafter.generate(ids, max_new_tokens=3).tokens == ref[:3]


def test_context_limit_stops_like_vanilla(first_arm):
    model = tiny_llama(seed=4, max_pos=24)
    base = BaseModel(model, None, "toy")
    drafter = CTCDrafter(base, new_draft_for(base, seed=0), generator="medusa", budget=64, proposer="ctc",
                         switch=first_arm)
    ids = torch.arange(1, 17)[None]  # 16 of 24 positions used
    spec = drafter.generate(ids, max_new_tokens=50)
    van = drafter.generate(ids, max_new_tokens=50, speculative=False)
    assert spec.tokens == van.tokens and len(spec.tokens) == 8 and spec.stop_reason == "context"
    with pytest.raises(Exception, match="context"):
        drafter.generate(torch.arange(1, 25)[None], max_new_tokens=5)


def test_kv_cache_holds_exactly_the_accepted_tokens(first_arm):
    """After every step the compacted cache equals a fresh prefill of prompt + emitted tokens (bonus excluded)."""
    from ctc_drafter.models.kv_cache import new_kv_cache

    base = BaseModel(tiny_llama(seed=5), None, "toy")
    drafter = CTCDrafter(base, new_draft_for(base, seed=0), generator="medusa", budget=64, proposer="ctc",
                         switch=first_arm)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    emitted, checked = [], []
    orig = drafter.speculative_step

    def spy(state, cache, picker, max_depth):
        if not emitted:
            emitted.append(state.root)  # the prefill's token
        new, hid, n = orig(state, cache, picker, max_depth)
        ref = new_kv_cache(base)
        base.forward(torch.tensor([ids[0].tolist() + emitted + new[:-1]]), ref)
        assert cache.get_seq_length() == ref.get_seq_length()
        if max_depth > 0:  # it proposed: the draft had read every position before the root
            assert drafter.proposer.cache.length + len(new) == ref.get_seq_length()
        for a, b in zip(cache.layers, ref.layers):
            torch.testing.assert_close(a.keys, b.keys, rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(a.values, b.values, rtol=1e-9, atol=1e-9)
        emitted.extend(new)
        checked.append(len(new))
        return new, hid, n

    drafter.speculative_step = spy
    res = drafter.generate(ids, max_new_tokens=20)
    assert emitted == res.tokens and len(checked) == res.steps - 1 and max(checked) > 1


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_tree_mask_exact_for_each_attention_implementation(attn, first_arm):
    """The custom 4D tree mask must be honoured by both attention back ends transformers offers on CPU."""
    model = tiny_llama(seed=6)
    model.set_attn_implementation(attn)
    assert model.config._attn_implementation == attn
    base = BaseModel(model, None, "toy")
    drafter = CTCDrafter(base, new_draft_for(base, seed=2), generator="medusa", budget=64, proposer="ctc",
                         switch=first_arm)
    ids = torch.tensor([[7, 3, 9, 9, 1]])
    spec = drafter.generate(ids, max_new_tokens=25)
    assert spec.tokens == hf_greedy(model, ids, 25)
    assert max(spec.accept_lengths) > 1


@pytest.mark.parametrize("generator", ["beam", "medusa", "prefix"])
def test_lossless_with_a_proposal_vocabulary(generator, first_arm):
    """A draft that can only propose 24 of the 64 tokens: the base still emits the others, output unchanged."""
    base = BaseModel(tiny_llama(dtype=torch.float64, seed=1), None, "toy")
    g = torch.Generator().manual_seed(7)
    emitted_outside = longest = 0
    for trial in range(4):
        draft = new_draft_for(base, seed=trial, draft_vocab=24)
        listed = torch.randperm(64, generator=g)[:24].sort().values
        draft.set_vocab(listed)
        drafter = CTCDrafter(base, draft, generator=generator, budget=16, proposer="ctc", switch=first_arm)
        ids = torch.randint(0, 64, (1, 6), generator=g)
        spec = drafter.generate(ids, max_new_tokens=30)
        assert spec.tokens == drafter.generate(ids, max_new_tokens=30, speculative=False).tokens \
            == hf_greedy(base.model, ids, 30)
        emitted_outside += sum(t not in set(listed.tolist()) for t in spec.tokens)
        longest = max(longest, max(spec.accept_lengths))
    assert emitted_outside > 0 and longest > 1
