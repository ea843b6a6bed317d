"""The CTC draft as a proposer: it owns the draft's KV cache and newest state, and a tree policy.

The draft reads the base's hidden states of accepted positions only (never speculative ones), from
its cursor in the decode state, so its cache grows as the request does and never rolls back.
"""

from __future__ import annotations

import torch

from ...draft.model import CTCDraftModel, DraftCache
from ...errors import CTCDrafterError
from .base import Proposer
from .frame_trees import FrameTreePolicy, make_policy


class CTCProposer(Proposer):
    name = "ctc"

    def __init__(self, draft: CTCDraftModel, policy: str | FrameTreePolicy = "beam", ctc_transform: bool | None = None):
        """ctc_transform: read the frames with the CTC rule (merge repeats, drop blanks), or take each path
        literally (False: no merging, the blank never proposed); None: as the draft was trained (loss ctc)."""
        self.draft = draft
        ctc = ctc_transform_for(draft, ctc_transform)
        self.policy = policy if isinstance(policy, FrameTreePolicy) else make_policy(policy, ctc=ctc)
        self.cache: DraftCache | None = None
        self.s_last: torch.Tensor | None = None  # [1,d] draft state of the newest accepted position

    def start(self, state):
        self.cache, self.s_last = DraftCache(), None
        self.catch_up(state)

    def catch_up(self, state) -> None:
        """Extend the draft's cache over the positions accepted since its last read (the prompt at start)."""
        hidden, next_ids = state.read_hidden(self)  # [1,m,d], the token after each position
        if next_ids:
            ids = torch.tensor([next_ids], device=hidden.device)
            self.s_last = self.draft.extend(hidden, ids, self.cache)

    def propose(self, state, max_depth, budget):
        self.catch_up(state)
        frames = self.draft.frames(self.s_last, self.cache)[0]  # [L, N+1]
        return self.policy.build(state.root, frames, max_depth, budget, symbols=self.draft.symbol_tokens())

    def finish(self, state):
        self.cache = self.s_last = None

    def describe(self):
        return {"proposer": self.name, "generator": self.policy.name, "ctc_transform": self.policy.ctc}


def ctc_transform_for(draft: CTCDraftModel, ctc_transform: bool | None) -> bool:
    """The transform a draft's trees use: as asked, or (None) as it was trained; a draft trained without a
    blank (loss ce) has nothing to collapse."""
    if ctc_transform is None:
        return draft.config.loss == "ctc"
    if ctc_transform and draft.config.loss != "ctc":
        raise CTCDrafterError("the CTC transform needs a draft trained with a blank (this one's loss is "
                              f"{draft.config.loss!r}): use --ctc-transform off or auto")
    return bool(ctc_transform)
