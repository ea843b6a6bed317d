"""Proposers: the n-gram index and proposer, calibration, the union, per-step tree sizing, and that
every proposer stays lossless (greedy speculative == our vanilla == HF generate on float64 toys)."""

import pytest
import torch

from conftest import tiny_llama
from ctc_drafter.decoding import CTCDrafter, DecodeState, Proposer, TokenTree, UnionProposer
from ctc_drafter.decoding.calibration import Calibration
from ctc_drafter.decoding.proposers.ngram import NgramIndex, NgramMemory, NgramProposer, continuation_scores
from ctc_drafter.decoding.tree_size import best_tree_size
from ctc_drafter.draft import new_draft_for
from ctc_drafter.models.base import BaseModel
from test_exactness import hf_greedy


# ---- n-gram index and proposer -------------------------------------------------------------------

def test_index_finds_the_most_recent_continuations_and_never_the_suffix_itself():
    idx = NgramIndex(max_n=3)
    idx.extend([1, 2, 3, 9, 1, 2, 4, 1, 2])
    assert idx.continuations((1, 2), depth=2, limit=5, before=8) == [[4, 1], [3, 9]]
    assert idx.continuations((1, 2), depth=2, limit=1, before=8) == [[4, 1]]
    assert idx.continuations((7,), depth=2, limit=5) == []


def test_proposer_uses_the_longest_match():
    p = NgramProposer(max_n=3)
    ctx = [5, 6, 7, 1, 8, 6, 7, 2, 6, 7]  # "6 7" is followed by 1 and by 2, "8 6 7" only by 2 ... but the
    p.start(DecodeState(ctx[:-1], ctx[-1]))  # suffix is "2 6 7"; its longest earlier match is "6 7"
    conts, n = p.match(ctx, depth=3)
    assert n == 2 and conts == [[2, 6, 7], [1, 8, 6]]
    ctx2 = [4, 6, 7, 3, 0, 4, 6, 7]  # suffix "4 6 7" was seen: the 3-gram wins over "6 7"
    p.start(DecodeState(ctx2[:-1], ctx2[-1]))
    assert p.match(ctx2, depth=2) == ([[3, 0]], 3)


def test_tree_scores_are_continuation_shares():
    s = continuation_scores([[1, 2], [1, 3], [1, 2], [4]], n=1)
    half = 0.5  # n/(n+1) for a 1-gram match
    assert s[(1,)] == pytest.approx(half * 3 / 4) and s[(4,)] == pytest.approx(half / 4)
    assert s[(1, 2)] == pytest.approx(s[(1,)] * half * 2 / 3)
    assert TokenTree.from_prefix_scores(9, s, budget=2).tokens == [9, 1]  # best first
    tree = TokenTree.from_prefix_scores(9, s, budget=3)
    assert tree.tokens == [9, 1, 4] and tree.parents == [-1, 0, 0]  # (1,2) and (4,) tie at 1/8: shallower kept


def test_memory_remembers_earlier_requests_but_not_across_their_boundary():
    mem = NgramMemory(max_n=3)
    p = NgramProposer(max_n=3, memory=mem)
    state = DecodeState([10, 11, 12, 13, 14], 15)
    p.start(state)
    state.append([16, 17], None)
    p.finish(state)  # remembers the whole request, the tokens since its last read included
    assert mem.documents == 1
    p.start(state := DecodeState([30, 12, 13], 14))  # "12 13 14" was seen in the earlier request
    tree = p.propose(state, max_depth=4, budget=8)
    assert [tree.tokens[i] for i in tree.path_to(len(tree) - 1)][1:] == [15, 16, 17]  # stops at the boundary
    p.start(state := DecodeState([1, 2], 17))
    assert p.propose(state, 4, 8).tokens == [17]  # a 1-gram is not looked up in the memory


def test_memory_stays_bounded():
    mem = NgramMemory(max_n=2, max_tokens=100)
    for d in range(20):
        mem.add(list(range(d * 30, d * 30 + 30)))
    assert len(mem.index) <= 100 and mem.index.continuations((19 * 30 + 3,), 2, 1) == [[19 * 30 + 4, 19 * 30 + 5]]


# ---- calibration, union, tree size ---------------------------------------------------------------

def test_calibration_counts_only_nodes_whose_parent_the_base_took():
    tree = TokenTree([0, 5, 6, 7, 8], [-1, 0, 0, 1, 3], scores=[1.0, 0.5, 0.25, 0.4, 0.2])
    cal = Calibration()
    cal.update(tree, emitted=[5, 9])  # took 5, then the base said 9 (node 3, token 7, rejected)
    b = Calibration.bucket
    assert cal.seen[b(0.5)] == 1 and cal.hits[b(0.5)] == 1  # node 1 (conditional 0.5): taken
    assert cal.seen[b(0.25)] == 1 and cal.hits[b(0.25)] == 0  # node 2 (0.25): its parent was taken, it was not
    assert cal.seen[b(0.8)] == 1 and cal.hits[b(0.8)] == 0  # node 3: conditional 0.4 / 0.5 = 0.8, rejected
    assert sum(cal.seen) == 3  # node 4's parent (node 3) was rejected: the base's choice there is unknown
    p = cal.path_probs(tree)
    assert all(p[i] <= p[tree.parents[i]] for i in range(1, len(tree)))


class FixedProposer(Proposer):
    """Always proposes the same chain with the same raw score per token (for union tests)."""

    def __init__(self, name, chain, raw):
        self.name, self.chain, self.raw = name, chain, raw

    def propose(self, state, max_depth, budget):
        chain = self.chain[:max_depth]
        scores = [1.0] + [self.raw ** (d + 1) for d in range(len(chain))]
        return TokenTree([state.root] + chain, list(range(-1, len(chain))), scores=scores)


def test_union_learns_which_source_to_trust():
    """Source a is always right but modest (raw 0.3), b always wrong but confident (0.9): after
    feedback the union's small budget goes to a's chain."""
    a, b = FixedProposer("a", [1, 2, 3], 0.3), FixedProposer("b", [7, 8, 9], 0.9)
    u, state = UnionProposer([a, b]), DecodeState([], 0)
    first = u.propose(state, max_depth=3, budget=4)
    assert first.tokens[1:] == [7, 8, 9]  # uncalibrated: b looks better
    for _ in range(30):
        tree = u.propose(state, 3, 4)
        u.feedback(tree, emitted=[1, 2, 3, 4])
    assert u.propose(state, 3, 4).tokens[1:] == [1, 2, 3]


def test_tree_size_trades_expected_tokens_against_cost():
    probs = [0.9, 0.8, 0.1, 0.05]
    flat = lambda n: 10.0  # noqa: E731 - nodes are free: take every useful one
    assert best_tree_size(probs, flat, max_nodes=16) == 5
    steep = lambda n: 10.0 * n  # noqa: E731 - each node costs a whole pass: never worth it
    assert best_tree_size(probs, steep, max_nodes=16) == 1
    step = lambda n: 10.0 if n <= 3 else 20.0  # noqa: E731 - a jump after 3 nodes
    assert best_tree_size(probs, step, max_nodes=16) == 3  # (1+.9+.8)/10 > (1+1.85)/20
    assert best_tree_size(probs, flat, max_nodes=2) == 2


# ---- lossless with every proposer ----------------------------------------------------------------

def repetitive_prompt(g, length=14):
    """A prompt that repeats a short motif: n-gram lookup then has something to find."""
    motif = torch.randint(0, 64, (4,), generator=g).tolist()
    return torch.tensor([(motif * 8)[:length]])


@pytest.mark.parametrize("proposer,sized", [("ngram", False), ("hybrid", False), ("hybrid", True)])
def test_every_proposer_is_lossless(proposer, sized, first_arm):
    base = BaseModel(tiny_llama(dtype=torch.float64, seed=1), None, "toy")
    g = torch.Generator().manual_seed(3)
    cost = (lambda n: 10.0 + 0.5 * n) if sized else None
    longest, sizes = 1, set()
    for trial in range(4):
        draft = new_draft_for(base, seed=trial)
        drafter = CTCDrafter(base, draft, generator="prefix", budget=12, proposer=proposer, cost_ms=cost,
                             switch=first_arm)
        ids = repetitive_prompt(g) if trial % 2 else torch.randint(0, 64, (1, 9), generator=g)
        spec = drafter.generate(ids, max_new_tokens=40)
        van = drafter.generate(ids, max_new_tokens=40, speculative=False)
        assert spec.tokens == van.tokens == hf_greedy(base.model, ids, 40)
        assert sum(spec.accept_lengths) == 40 and len(spec.accept_lengths) == spec.steps
        longest = max(longest, max(spec.accept_lengths))
        sizes |= set(spec.tree_sizes)
    assert longest > 2, "no step accepted two draft tokens: the multi-token path is untested"
    if sized:
        assert len(sizes) > 1, "the per-step tree size never varied"


def test_ngram_needs_no_draft_and_remembers_across_requests(first_arm):
    base = BaseModel(tiny_llama(dtype=torch.float64, seed=2), None, "toy")
    drafter = CTCDrafter(base, None, proposer="ngram", budget=8, switch=first_arm)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    first = drafter.generate(ids, max_new_tokens=30)
    again = drafter.generate(ids, max_new_tokens=30)  # the same request: its earlier answer is in the memory
    assert first.tokens == again.tokens == hf_greedy(base.model, ids, 30)
    assert again.steps < first.steps
    drafter.proposer.forget()  # what demo does before each timed run: no help from remembered answers
    assert drafter.generate(ids, max_new_tokens=30).steps == first.steps


class RepeatLast(Proposer):
    """README's custom proposer: guesses that the newest token repeats (up to 3 times)."""

    name = "repeat"

    def propose(self, state, max_depth, budget):
        n = min(3, max_depth, budget - 1)
        return TokenTree([state.root] * (n + 1), list(range(-1, n)))


def test_readme_custom_proposer_is_lossless(first_arm):
    model = tiny_llama(dtype=torch.float64, seed=7)
    with torch.no_grad():  # make repeats likely: the model copies its input token
        model.lm_head.weight.copy_(model.model.embed_tokens.weight * 20)
    base = BaseModel(model, None, "toy")
    drafter = CTCDrafter(base, proposer=RepeatLast(), budget=4, switch=first_arm)
    ids = torch.tensor([[5, 5, 5, 2]])
    spec = drafter.generate(ids, max_new_tokens=20)
    assert spec.tokens == hf_greedy(model, ids, 20) and spec.steps < 20
