"""Several proposers' trees merged into one trie under one node budget, chosen by calibrated acceptance.

Each source's scores are calibrated against what the base accepted (decoding/calibration.py), so
nodes from different sources compete on one scale; a node proposed by several sources takes the
highest estimate. With a cost model the tree is then sized per step (decoding/tree_size.py): a
confident step can verify a long n-gram chain, an unsure one stays small.

Modes: "full" asks every source; "cheap" only the cheap ones (n-gram lookup), skipping the draft's
layers on steps where the loop has measured that they do not pay (decoding/switch.py). A skipped
source is caught up on the emitted tokens (and their hidden states) when it next proposes.
"""

from __future__ import annotations

from typing import Callable

from ..calibration import Calibration
from ..tree import TokenTree
from ..tree_size import best_tree_size
from .base import Backlog, Proposer


class UnionProposer(Proposer):
    def __init__(self, parts: list[Proposer], cost_ms: Callable[[int], float] | None = None, name: str | None = None):
        self.parts = parts
        self.name = name or "+".join(p.name for p in parts)
        self.calibration = [Calibration() for _ in parts]
        self.cost_ms = cost_ms  # verification pass cost for n nodes; None: always fill the budget
        self.modes = ("full", "cheap") if any(p.cheap for p in parts) and not all(p.cheap for p in parts) \
            else ("full",)
        self.cheap = all(p.cheap for p in parts)
        self.mode = "full"
        self._last: list[tuple[int, TokenTree]] = []  # (part, its tree) of the step
        self._pending = [Backlog() for _ in parts]  # per part: the steps it skipped

    def set_mode(self, mode):
        if mode not in self.modes:
            raise ValueError(f"mode {mode!r} is not one of {self.modes}")
        self.mode = mode

    def _active(self, i: int) -> bool:
        return self.mode == "full" or self.parts[i].cheap

    def _catch_up(self, i: int) -> None:
        """Give part i, in one call, the tokens of the steps it skipped (before anything newer)."""
        self._pending[i].flush_into(self.parts[i])

    def start(self, prompt_ids, prompt_hidden, first_token):
        self.mode, self._pending = "full", [Backlog() for _ in self.parts]
        for p in self.parts:
            p.start(prompt_ids, prompt_hidden, first_token)

    def propose(self, context, root, max_depth, budget):
        merged: dict[tuple[int, ...], float] = {}
        self._last = []
        for i, (part, cal) in enumerate(zip(self.parts, self.calibration)):
            if not self._active(i):
                continue
            self._catch_up(i)
            tree = part.propose(context, root, max_depth, budget)
            self._last.append((i, tree))
            for prefix, p in zip(tree.prefixes()[1:], cal.path_probs(tree)[1:]):
                if p > merged.get(prefix, -1.0):
                    merged[prefix] = p
        if self.cost_ms is not None and merged:
            budget = best_tree_size(list(merged.values()), self.cost_ms, budget)
        return TokenTree.from_prefix_scores(root, merged, budget)

    def feedback(self, tree, emitted):
        for i, own in self._last:
            self.calibration[i].update(own, emitted)
            self.parts[i].feedback(own, emitted)

    def accept(self, new_tokens, path_hidden):
        for i, p in enumerate(self.parts):
            if self._active(i):
                self._catch_up(i)
                p.accept(new_tokens, path_hidden)
            else:
                self._pending[i].add(new_tokens, path_hidden)

    def finish(self):
        self.mode, self._pending = "full", [Backlog() for _ in self.parts]
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
