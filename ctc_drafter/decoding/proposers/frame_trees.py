"""Tree policies for the CTC draft: how one step's frame distributions become a token tree.

  - `medusa`: the paper's static tree (Medusa's 63 choices over the frames' top-k, one level per
    frame), every path collapsed by the CTC rule and identical collapsed prefixes merged;
  - `beam`: CTC prefix beam search, the most probable collapsed sequences merged into a trie
    capped at a node budget;
  - `prefix`: the budget's worth of prefixes most likely to start the output, each scored by its exact
    CTC prefix probability (best-first; the tree that maximises the draft's expected accepted length).
Node scores are the draft's probability mass through each node.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from ...draft.ctc import best_prefixes, collapse, prefix_beam_search
from ...errors import CTCDrafterError
from ..tree import TokenTree

# Medusa's mc_sim_7b_63: the 63 paths (top-k rank per level) of the paper's `--tree-choices medusa`.
MEDUSA_63 = [
    [0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4], [2, 0], [0, 5],
    [0, 0, 1], [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8], [0, 0, 2], [3, 0], [0, 9], [8],
    [9], [1, 0, 0], [0, 2, 0], [1, 2], [0, 0, 3], [4, 0], [2, 1], [0, 0, 4], [0, 0, 5], [0, 0, 0, 0],
    [0, 1, 1], [0, 0, 6], [0, 3, 0], [5, 0], [1, 3], [0, 0, 7], [0, 0, 8], [0, 0, 9], [6, 0], [0, 4, 0],
    [1, 4], [7, 0], [0, 1, 2], [2, 0, 0], [3, 1], [2, 2], [8, 0], [0, 5, 0], [1, 5], [1, 0, 1], [0, 2, 1],
    [9, 0], [0, 6, 0], [0, 0, 0, 1], [1, 6], [0, 7, 0],
]


class FrameTreePolicy(ABC):
    """Maps the draft's frame log-probs for the newest position to a tree of candidate continuations."""

    name: str = "base"

    def __init__(self, ctc: bool = True):
        self.ctc = ctc  # False for Medusa-style CE heads: frame j is token j, no blank, no merging

    @abstractmethod
    def build(self, root: int, frame_logprobs: torch.Tensor, max_depth: int, budget: int,
              symbols: list[int] | None = None) -> TokenTree:
        """frame_logprobs [L, N+1] (blank last) -> tree rooted at `root`, <= budget nodes, depth <= max_depth.

        symbols: the token id of each of the N frame symbols (a draft with a proposal vocabulary);
        None when symbol i is token i.
        """


def _to_tokens(seq, symbols):
    return list(seq) if symbols is None else [symbols[s] for s in seq]


class MedusaTree(FrameTreePolicy):
    """The paper-faithful static tree with the CTC transform."""

    name = "medusa"

    def __init__(self, ctc: bool = True, choices=MEDUSA_63):
        super().__init__(ctc)
        self.choices = [list(c) for c in choices]
        self.topk = 1 + max(max(c) for c in self.choices)
        self.levels = max(len(c) for c in self.choices)

    def build(self, root, frame_logprobs, max_depth, budget, symbols=None):
        L, S = frame_logprobs.shape
        blank = S - 1
        levels = min(self.levels, L)
        lp = frame_logprobs[:levels].float()
        if not self.ctc:
            lp = lp[:, :blank]
        vals, idx = lp.topk(min(self.topk, lp.shape[1]), dim=-1)
        vals, idx = vals.tolist(), idx.tolist()
        scored = []
        for path in self.choices:
            if len(path) > levels or max(path) >= len(idx[0]):
                continue
            syms = [idx[f][r] for f, r in enumerate(path)]
            logp = sum(vals[f][r] for f, r in enumerate(path))
            toks = collapse(syms, blank) if self.ctc else syms
            scored.append((_to_tokens(toks, symbols), logp))
        # Each path's probability counts once for its collapsed sequence; merged prefixes add up.
        return TokenTree.from_sequences(root, scored, budget=budget, max_depth=max_depth)


class BeamTree(FrameTreePolicy):
    """CTC prefix beam search over all frames; the most probable collapsed sequences form the trie."""

    name = "beam"

    def __init__(self, ctc: bool = True, beam: int | None = None, topk: int = 8):
        super().__init__(ctc)
        self.beam = beam  # None: max(8, budget)
        self.topk = topk

    def build(self, root, frame_logprobs, max_depth, budget, symbols=None):
        S = frame_logprobs.shape[1]
        lp = frame_logprobs if self.ctc else frame_logprobs[:, : S - 1]
        seqs = prefix_beam_search(lp, blank=S - 1, beam=self.beam or max(8, budget), topk=self.topk, ctc=self.ctc)
        return TokenTree.from_sequences(root, [(_to_tokens(s, symbols), p) for s, p in seqs], budget=budget,
                                        max_depth=max_depth)


class PrefixTree(FrameTreePolicy):
    """The budget-1 collapsed prefixes with the highest P(output starts with prefix), as one tree."""

    name = "prefix"

    def __init__(self, ctc: bool = True, topk: int = 8):
        super().__init__(ctc)
        self.topk = topk

    def build(self, root, frame_logprobs, max_depth, budget, symbols=None):
        S = frame_logprobs.shape[1]
        lp = frame_logprobs if self.ctc else frame_logprobs[:, : S - 1]
        best = best_prefixes(lp, blank=S - 1, n=budget - 1, topk=self.topk, ctc=self.ctc, max_len=max_depth)
        # The set is prefix-closed and has budget-1 nodes, so the trie keeps every one of them; each
        # node's score is its own prefix probability (the chance the base accepts the path to it).
        return TokenTree.from_prefix_scores(root, {tuple(_to_tokens(g, symbols)): math.exp(s) for g, s in best},
                                            budget=budget)


POLICIES = {"medusa": MedusaTree, "beam": BeamTree, "prefix": PrefixTree}


def make_policy(name: str, ctc: bool = True) -> FrameTreePolicy:
    if name not in POLICIES:
        raise CTCDrafterError(f"unknown tree policy {name!r} (use {' or '.join(POLICIES)})")
    return POLICIES[name](ctc=ctc)
