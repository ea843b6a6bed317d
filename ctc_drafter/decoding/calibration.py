"""Calibrating proposers' scores against what the base model actually accepted.

A proposer's node score is its own estimate that the base accepts the path to that node; "0.6"
from the CTC draft and "0.6" from a 5-token n-gram match need not mean the same. We calibrate the
per-token *conditional* estimate (score of a node / score of its parent: how likely the base takes
this token once it has taken the parent), because that is what the base decides at each node. For
each source, running counts per score bucket record how often such a node matched the base's own
next token, and the calibrated path probability is the product of calibrated conditionals.

A node is counted only when its parent's path was taken by the base this step (otherwise the
base's choice there is unknown); nodes cut from the verified tree still count, since the base's
token after every accepted node is known from the step's output (greedy: exactly; sampling: the
realised sample).
"""

from __future__ import annotations

import bisect

from .tree import TokenTree

# Bucket edges over the raw conditional estimate; finer near 0 and 1 where decisions are made.
EDGES = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.97)


class Calibration:
    """Running accept counts per raw-score bucket for one source; starts out trusting the raw score."""

    def __init__(self, prior_weight: float = 4.0):
        self.prior_weight = prior_weight  # pseudo-observations at the raw score itself
        self.seen = [0] * (len(EDGES) + 1)
        self.hits = [0] * (len(EDGES) + 1)

    @staticmethod
    def bucket(raw: float) -> int:
        return bisect.bisect_right(EDGES, raw)

    def conditional(self, raw: float) -> float:
        b = self.bucket(raw)
        return (self.hits[b] + self.prior_weight * raw) / (self.seen[b] + self.prior_weight)

    def path_probs(self, tree: TokenTree) -> list[float]:
        """Calibrated P(base accepts the path to node) for every node (root 1.0)."""
        p = [1.0] * len(tree)
        for i in range(1, len(tree)):
            p[i] = p[tree.parents[i]] * self.conditional(raw_conditional(tree, i))
        return p

    def update(self, tree: TokenTree, emitted: list[int]) -> None:
        """emitted: the step's output (accepted draft tokens + the base's bonus token)."""
        on_path = [False] * len(tree)  # node's path is a prefix of `emitted`
        on_path[0] = True
        for i in range(1, len(tree)):
            parent, d = tree.parents[i], tree.depths[i]
            if not on_path[parent] or d > len(emitted):
                continue
            hit = tree.tokens[i] == emitted[d - 1]
            on_path[i] = hit
            b = self.bucket(raw_conditional(tree, i))
            self.seen[b] += 1
            self.hits[b] += hit

    def table(self) -> list[dict]:
        """Per bucket: raw-score range, nodes seen, share the base accepted (for reports and tests)."""
        lo = (0.0,) + EDGES
        hi = EDGES + (1.0,)
        return [{"raw": f"{a:.2f}-{b:.2f}", "seen": s, "accepted": round(h / s, 4) if s else None}
                for a, b, s, h in zip(lo, hi, self.seen, self.hits)]


def raw_conditional(tree: TokenTree, i: int) -> float:
    parent = tree.scores[tree.parents[i]]
    return min(1.0, tree.scores[i] / parent) if parent > 0 else 0.0
