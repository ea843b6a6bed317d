"""The proposer interface: who suggests the draft tokens that the base model verifies.

The verify loop (decoding/generate.py) knows nothing of how candidates are made. Per request it
calls `start(state)` once after the prefill, then per speculative step `propose(state, max_depth,
budget)` and `feedback(tree, emitted)`, and `finish(state)` at the end of the request.

`state` (decoding/state.py, a DecodeState) is the request's one sequence: `state.tokens` (prompt +
emitted so far, read-only), `state.root` (the newest token), and the base's hidden states at every
position before the root. A proposer that keeps its own view (an index, a draft's cache) catches up
by reading what it has not seen from its cursor: `state.read_tokens(self)`, `state.read_hidden(self)`;
steps it did not propose on (plain steps, a union's cheap mode) come with the next read.

The contract, checked on every tree before the base verifies it (decoding/tree.py `check_tree`; a
breach is a CTCDrafterError naming the proposer): the tree is rooted at `state.root`, has at most
`budget` nodes (root included) and depth at most `max_depth`, lists each parent before its children,
gives siblings different tokens, and uses token ids of the base's vocabulary. Any such tree is
verified losslessly: the output is the base's own whatever the proposer suggests.

Plugins: `--proposer package.module:Class` (and `proposer="package.module:Class"` in the Python API)
loads a Proposer subclass, constructed with `draft=` (the loaded draft model, or None) if its
__init__ takes `draft`, else with no arguments.

Not transformers' `CandidateGenerator`: that returns one chain plus logits for assisted decoding;
a proposer returns a scored tree and keeps its own state across steps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from ..state import DecodeState
from ..tree import TokenTree


class Proposer(ABC):
    """Suggests a token tree per step; `TokenTree.scores` estimate how likely the base accepts each node."""

    name: str = "proposer"

    def start(self, state: DecodeState) -> None:
        """A new request: `state` holds the prompt, the base's first token (the first root) and the base's
        hidden states over the prompt."""

    @abstractmethod
    def propose(self, state: DecodeState, max_depth: int, budget: int) -> TokenTree:
        """A tree rooted at `state.root` with at most `budget` nodes (root included) and depth at most
        `max_depth` (>= 1)."""

    def feedback(self, tree: TokenTree, emitted: list[int]) -> None:
        """After verification of `tree` (this proposer's own tree): the tokens the base emitted (accepted
        draft tokens + its bonus token), for proposers that learn from what the base accepts."""

    def finish(self, state: DecodeState) -> None:
        """The request is over; `state` holds all of it (its text may be remembered for later requests)."""

    def forget(self) -> None:
        """Drop what earlier requests taught (memories); measurements that repeat a prompt call it, since
        a remembered answer to the same prompt would inflate what it measures."""

    def describe(self) -> dict:
        """Settings that identify this proposer in answer files and --json output."""
        return {"proposer": self.name}


class SwitchModes:
    """Optional mixin for the speculation switch (decoding/switch.py). A proposer without it has one
    mode, "full", and the switch weighs it against plain 1-token steps."""

    modes: tuple[str, ...] = ("full",)  # ways to propose, dearest first; the loop measures which pays
    cheap: bool = False  # proposes at next to no cost (no model to run): no plain arm beside it

    def set_mode(self, mode: str) -> None:
        """Propose the `mode` way (one of `modes`) from the next step on; a new request starts "full"."""


def modes_of(proposer) -> tuple[str, ...]:
    return tuple(proposer.modes) if isinstance(proposer, SwitchModes) else ("full",)


def is_cheap(proposer) -> bool:
    return isinstance(proposer, SwitchModes) and proposer.cheap
