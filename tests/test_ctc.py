"""The CTC rule and CTC prefix beam search, checked against brute-force enumeration of alignments."""

import itertools
import math

import pytest
import torch

from ctc_drafter.draft.ctc import best_prefixes, collapse, prefix_beam_search


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


def _brute_prefix_probs(lp, blank, ctc=True):
    """P(collapsed output starts with g) for every prefix g, by enumerating all alignments."""
    L, S = lp.shape
    out = {}
    for path in itertools.product(range(S), repeat=L):
        p = math.exp(sum(lp[t, s].item() for t, s in enumerate(path)))
        seq = collapse(path, blank) if ctc else list(path)
        for d in range(1, len(seq) + 1):
            out[tuple(seq[:d])] = out.get(tuple(seq[:d]), 0.0) + p
    return out


@pytest.mark.parametrize("seed,L,S,ctc", [(0, 3, 4, True), (1, 4, 4, True), (2, 5, 3, True), (3, 3, 4, False)])
def test_best_prefixes_are_the_exact_most_likely_prefixes(seed, L, S, ctc):
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(L, S, generator=g, dtype=torch.float64) * 2, -1)
    blank = S - 1
    truth = _brute_prefix_probs(lp, blank, ctc)
    n = 10
    got = best_prefixes(lp, blank, n, topk=None, ctc=ctc)
    for prefix, logp in got:  # exact scores
        assert math.isclose(math.exp(logp), truth[prefix], rel_tol=1e-9), prefix
    want = sorted(truth.values(), reverse=True)[:n]
    assert [math.exp(v) for _, v in got] == pytest.approx(want, rel=1e-9)  # and the true top n
    kept = {p for p, _ in got}
    assert all(p[:-1] in kept or len(p) == 1 for p in kept)  # prefix-closed: a tree
    assert len(kept) == len(got)


def test_best_prefixes_respect_max_len_and_topk():
    g = torch.Generator().manual_seed(5)
    lp = torch.log_softmax(torch.randn(6, 9, generator=g, dtype=torch.float64), -1)
    got = best_prefixes(lp, 8, 20, topk=2, max_len=2)
    allowed = {c for row in lp[:, :8].topk(2, -1).indices.tolist() for c in row}
    assert got and all(len(p) <= 2 and set(p) <= allowed for p, _ in got)
