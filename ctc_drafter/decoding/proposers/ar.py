"""The autoregressive CTC draft as a proposer: per step, `levels` log-prob rows from the head run on
its own top-1 path, laid out as a tree by the same policies as the NAR draft's frames.

Start, accept and finish are the NAR proposer's: the draft's cache holds accepted positions only
and grows with `accept`; each step's speculative levels are scratch past its end.
"""

from __future__ import annotations

from ...draft.ar_model import ARDraftModel
from .ctc import CTCProposer
from .frame_trees import FrameTreePolicy


class ARProposer(CTCProposer):
    name = "ctc"  # the same CLI proposer (and default budgets); describe() names the architecture

    def __init__(self, draft: ARDraftModel, policy: str | FrameTreePolicy = "beam", levels: int | None = None):
        super().__init__(draft, policy)
        self.levels = levels or draft.config.num_frames  # config default: the reference's 4

    def propose(self, context, root, max_depth, budget):
        # Levels past the depth the loop can still verify would only cost draft passes.
        n = max(1, min(self.levels, max_depth))
        rows = self.draft.levels(self.s_last, self.cache, n)[0]  # [n, N+1]
        return self.policy.build(root, rows, max_depth, budget, symbols=self.draft.symbol_tokens())

    def describe(self):
        return {**super().describe(), "architecture": "ar", "levels": self.levels}
