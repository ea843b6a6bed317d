"""Several proposers' trees merged into one trie under one node budget, chosen by calibrated acceptance.

Each source's scores are calibrated against what the base accepted (decoding/calibration.py), so
nodes from different sources compete on one scale; a node proposed by several sources takes the
highest estimate. With a cost model the tree is then sized per step (decoding/tree_size.py): a
confident step can verify a long n-gram chain, an unsure one stays small.
"""

from __future__ import annotations

from typing import Callable

from ..calibration import Calibration
from ..tree import TokenTree
from ..tree_size import best_tree_size
from .base import Proposer


class UnionProposer(Proposer):
    def __init__(self, parts: list[Proposer], cost_ms: Callable[[int], float] | None = None, name: str | None = None):
        self.parts = parts
        self.name = name or "+".join(p.name for p in parts)
        self.calibration = [Calibration() for _ in parts]
        self.cost_ms = cost_ms  # verification pass cost for n nodes; None: always fill the budget
        self._last: list[TokenTree] = []

    def start(self, prompt_ids, prompt_hidden, first_token):
        for p in self.parts:
            p.start(prompt_ids, prompt_hidden, first_token)

    def propose(self, context, root, max_depth, budget):
        merged: dict[tuple[int, ...], float] = {}
        self._last = []
        for part, cal in zip(self.parts, self.calibration):
            tree = part.propose(context, root, max_depth, budget)
            self._last.append(tree)
            for prefix, p in zip(tree.prefixes()[1:], cal.path_probs(tree)[1:]):
                if p > merged.get(prefix, -1.0):
                    merged[prefix] = p
        if self.cost_ms is not None and merged:
            budget = best_tree_size(list(merged.values()), self.cost_ms, budget)
        return TokenTree.from_prefix_scores(root, merged, budget)

    def feedback(self, tree, emitted):
        for part, cal, own in zip(self.parts, self.calibration, self._last):
            cal.update(own, emitted)
            part.feedback(own, emitted)

    def accept(self, new_tokens, path_hidden):
        for p in self.parts:
            p.accept(new_tokens, path_hidden)

    def finish(self):
        for p in self.parts:
            p.finish()

    def forget(self):
        for p in self.parts:
            p.forget()

    def describe(self):
        d = {"proposer": self.name}
        for p in self.parts:
            d.update({k: v for k, v in p.describe().items() if k != "proposer"})
        d["sized_by_cost"] = self.cost_ms is not None
        return d
