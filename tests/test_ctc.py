"""The CTC rule and CTC prefix beam search, checked against brute-force enumeration of alignments."""

import itertools
import math

import pytest
import torch

from ctc_drafter.draft.ctc import collapse, prefix_beam_search


def test_collapse_merges_repeats_then_drops_blanks():
    B = 9
    assert collapse([1, 1, B, 1, 2, 2, B, B, 3], B) == [1, 1, 2, 3]
    assert collapse([B, B, B], B) == []
    assert collapse([4, 4, 4], B) == [4]
    assert collapse([4, B, 4], B) == [4, 4]


def brute_force(lp: torch.Tensor, blank: int) -> dict:
    """Every alignment of L frames over S symbols, summed per collapsed sequence."""
    L, S = lp.shape
    totals = {}
    for path in itertools.product(range(S), repeat=L):
        p = math.exp(sum(lp[t, s].item() for t, s in enumerate(path)))
        key = tuple(collapse(path, blank))
        totals[key] = totals.get(key, 0.0) + p
    return totals


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("L,S", [(3, 3), (4, 4), (5, 3)])
def test_prefix_beam_search_exact_without_pruning(seed, L, S):
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(L, S, generator=g).double() * 2, -1)
    blank = S - 1
    exact = brute_force(lp, blank)
    got = dict((k, math.exp(v)) for k, v in prefix_beam_search(lp, blank, beam=None, topk=None))
    assert set(got) == set(exact)
    for k in exact:
        assert got[k] == pytest.approx(exact[k], rel=1e-9, abs=1e-12)
    assert sum(got.values()) == pytest.approx(1.0, rel=1e-9)
    # Ranked best first.
    ranked = [math.exp(v) for _, v in prefix_beam_search(lp, blank, beam=None, topk=None)]
    assert ranked == sorted(ranked, reverse=True)


def test_beam_keeps_the_true_best_sequences_when_wide_enough():
    g = torch.Generator().manual_seed(7)
    lp = torch.log_softmax(torch.randn(4, 5, generator=g) * 3, -1)
    exact = brute_force(lp, 4)
    best = sorted(exact, key=lambda k: -exact[k])[:3]
    got = [k for k, _ in prefix_beam_search(lp, 4, beam=64, topk=None)[:3]]
    assert got == best


def test_plain_heads_mode_is_ordinary_beam_search():
    # ctc=False: no blank, no merging; frame j is token j, so sequences have length L.
    lp = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]]), -1)
    out = prefix_beam_search(lp, blank=2, beam=None, topk=None, ctc=False)
    assert all(len(s) == 2 for s, _ in out)
    assert out[0][0] == (0, 1)
    assert sum(math.exp(p) for _, p in out) == pytest.approx(1.0)
