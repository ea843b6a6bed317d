"""Several proposers' trees merged into one trie under one node budget, chosen by calibrated acceptance.

Each source's scores are calibrated against what the base accepted (decoding/calibration.py), so
nodes from different sources compete on one scale; a node proposed by several sources takes the
highest estimate. With a cost model the tree is then sized per step (decoding/tree_size.py): a
confident step can verify a long n-gram chain, an unsure one stays small.

Modes: "full" asks every source; "cheap" only the cheap ones (n-gram lookup), skipping the draft's
layers on steps where the loop has measured that they do not pay (decoding/switch.py). A skipped
source catches up from its own cursor in the decode state when it next proposes.
"""

from __future__ import annotations

from typing import Callable

from ..calibration import Calibration
from ..tree import TokenTree
from ..tree_size import best_tree_size
from .base import Proposer, SwitchModes, is_cheap


class UnionProposer(Proposer, SwitchModes):
    def __init__(self, parts: list[Proposer], cost_ms: Callable[[int], float] | None = None, name: str | None = None):
        self.parts = parts
        self.name = name or "+".join(p.name for p in parts)
        self.calibration = [Calibration() for _ in parts]
        self.cost_ms = cost_ms  # verification pass cost for n nodes; None: always fill the budget
        cheap = [is_cheap(p) for p in parts]
        self.modes = ("full", "cheap") if any(cheap) and not all(cheap) else ("full",)
        self.cheap = all(cheap)
        self.mode = "full"
        self._last: list[tuple[int, TokenTree]] = []  # (part, its tree) of the step

    def set_mode(self, mode):
        if mode not in self.modes:
            raise ValueError(f"mode {mode!r} is not one of {self.modes}")
        self.mode = mode

    def _active(self, i: int) -> bool:
        return self.mode == "full" or is_cheap(self.parts[i])

    def start(self, state):
        self.mode = "full"
        for p in self.parts:
            p.start(state)

    def propose(self, state, max_depth, budget):
        merged: dict[tuple[int, ...], float] = {}
        self._last = []
        for i, (part, cal) in enumerate(zip(self.parts, self.calibration)):
            if not self._active(i):
                continue
            tree = part.propose(state, max_depth, budget)
            self._last.append((i, tree))
            for prefix, p in zip(tree.prefixes()[1:], cal.path_probs(tree)[1:]):
                if p > merged.get(prefix, -1.0):
                    merged[prefix] = p
        if self.cost_ms is not None and merged:
            budget = best_tree_size(list(merged.values()), self.cost_ms, budget)
        return TokenTree.from_prefix_scores(state.root, merged, budget)

    def feedback(self, tree, emitted):
        for i, own in self._last:
            self.calibration[i].update(own, emitted)
            self.parts[i].feedback(own, emitted)

    def finish(self, state):
        self.mode = "full"
        for p in self.parts:
            p.finish(state)

    def forget(self):
        for p in self.parts:
            p.forget()

    def describe(self):
        d = {"proposer": self.name}
        for p in self.parts:
            d.update({k: v for k, v in p.describe().items() if k != "proposer"})
        d["sized_by_cost"] = self.cost_ms is not None
        return d
