"""The proposer interface: who suggests the draft tokens that the base model verifies.

The verify loop (decoding/generate.py) knows nothing of how candidates are made. Per request it
calls `start` once after the prefill, then per speculative step `propose` (a TokenTree under the
root token the base already chose), `feedback` (what the base emitted after that tree), and `accept`
(the tokens emitted, with the base's hidden states at the accepted path, for proposers that read
them), and `finish` at the end of the request.

Not transformers' `CandidateGenerator`: that returns one chain plus logits for assisted decoding;
a proposer returns a scored tree and keeps its own state across steps.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..tree import TokenTree


class Proposer(ABC):
    """Suggests a token tree per step; `TokenTree.scores` estimate how likely the base accepts each node."""

    name: str = "proposer"
    modes: tuple[str, ...] = ("full",)  # ways to propose, dearest first; the loop measures which pays (switch.py)
    cheap: bool = False  # proposes at next to no cost (no model to run): a union's "cheap" mode keeps it alone

    def start(self, prompt_ids: list[int], prompt_hidden: torch.Tensor, first_token: int) -> None:
        """A new request. prompt_hidden [1,T,d]: the base's last hidden states over the prompt;
        first_token: the base's token after the prompt (the first root)."""

    @abstractmethod
    def propose(self, context: list[int], root: int, max_depth: int, budget: int) -> TokenTree:
        """context: prompt + tokens emitted so far (its last element is `root`). Returns a tree rooted at
        `root` with at most `budget` nodes (root included) and depth at most `max_depth`."""

    def set_mode(self, mode: str) -> None:
        """Propose the `mode` way (one of `modes`) from the next step on; a new request starts "full"."""

    def feedback(self, tree: TokenTree, emitted: list[int]) -> None:
        """After verification of `tree` (this proposer's own tree): the tokens the base emitted (accepted
        draft tokens + its bonus token), for proposers that learn from what the base accepts."""

    def accept(self, new_tokens: list[int], path_hidden: torch.Tensor) -> None:
        """The step's emitted tokens (accepted draft tokens + the base's bonus token); path_hidden
        [1,m,d]: the base's hidden states at the accepted path's nodes, m = len(new_tokens)."""

    def finish(self) -> None:
        """The request is over (its text may be remembered for later requests)."""

    def forget(self) -> None:
        """Drop what earlier requests taught (memories); measurements that repeat a prompt call it, since
        a remembered answer to the same prompt would inflate what it measures."""

    def describe(self) -> dict:
        """Settings that identify this proposer in answer files and --json output."""
        return {"proposer": self.name}


class Backlog:
    """Emitted tokens (and their hidden states) a proposer skipped, handed over in one `accept` later."""

    def __init__(self):
        self.items: list[tuple[list[int], torch.Tensor]] = []

    def add(self, new_tokens: list[int], path_hidden: torch.Tensor) -> None:
        self.items.append((list(new_tokens), path_hidden))

    def flush_into(self, proposer: Proposer) -> None:
        if self.items:
            tokens, hidden = sum((t for t, _ in self.items), []), torch.cat([h for _, h in self.items], 1)
            self.items = []
            proposer.accept(tokens, hidden)
