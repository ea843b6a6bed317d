"""The CTC draft as a proposer: it owns the draft's KV cache and newest state, and a tree policy.

The draft reads the base's hidden states of accepted positions only (never speculative ones), so
its cache grows with `accept` and never rolls back.
"""

from __future__ import annotations

import torch

from ...draft.model import CTCDraftModel, DraftCache
from ..tree import TokenTree
from .base import Proposer
from .frame_trees import FrameTreePolicy, make_policy


class CTCProposer(Proposer):
    name = "ctc"

    def __init__(self, draft: CTCDraftModel, policy: str | FrameTreePolicy = "beam"):
        self.draft = draft
        ctc = draft.config.loss == "ctc"
        self.policy = policy if isinstance(policy, FrameTreePolicy) else make_policy(policy, ctc=ctc)
        self.cache: DraftCache | None = None
        self.s_last: torch.Tensor | None = None  # [1,d] draft state of the newest accepted position

    def start(self, prompt_ids, prompt_hidden, first_token):
        self.cache = DraftCache()
        dev = prompt_hidden.device
        next_ids = torch.tensor([list(prompt_ids[1:]) + [first_token]], device=dev)  # token after each position
        self.s_last = self.draft.extend(prompt_hidden, next_ids, self.cache)

    def propose(self, context, root, max_depth, budget):
        frames = self.draft.frames(self.s_last, self.cache)[0]  # [L, N+1]
        return self.policy.build(root, frames, max_depth, budget, symbols=self.draft.symbol_tokens())

    def accept(self, new_tokens, path_hidden):
        ids = torch.tensor([new_tokens], device=path_hidden.device)
        self.s_last = self.draft.extend(path_hidden, ids, self.cache)

    def finish(self):
        self.cache = self.s_last = None

    def describe(self):
        return {"proposer": self.name, "generator": self.policy.name}
