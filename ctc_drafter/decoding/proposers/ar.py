"""The autoregressive CTC draft as a proposer: per step, `levels` log-prob rows from the head run on
its own top-1 path, laid out as a tree by the same policies as the NAR draft's frames.

Start, catch-up and finish are the NAR proposer's: the draft's cache holds accepted positions only;
each step's speculative levels are scratch past its end.
"""

from __future__ import annotations

from ...draft.ar_model import ARDraftModel
from .ctc import CTCProposer
from .frame_trees import FrameTreePolicy

# Draft no further level once the top-1 path's probability is below this: deeper nodes would score
# lower still, under what a tree takes. Tuned on held-out prompts: up to 0.1 beta was unchanged, and
# the draft's step got cheaper (BENCHMARKS.md, "The autoregressive head as the shipped draft").
MIN_PATH_PROB = 0.1


class ARProposer(CTCProposer):
    name = "ctc"  # the same CLI proposer (and default budgets); describe() names the architecture

    def __init__(self, draft: ARDraftModel, policy: str | FrameTreePolicy = "beam", levels: int | None = None,
                 min_path_prob: float = MIN_PATH_PROB, ctc_transform: bool | None = None):
        super().__init__(draft, policy, ctc_transform)
        self.levels = levels or draft.config.num_frames  # config default: the reference's 4
        self.min_path_prob = min_path_prob  # 0: every level

    def propose(self, state, max_depth, budget):
        self.catch_up(state)
        # Levels past the depth the loop can still verify, or below an unlikely top-1 path, would only
        # cost draft passes.
        n = max(1, min(self.levels, max_depth))
        rows = self.draft.levels(self.s_last, self.cache, n, self.min_path_prob)[0]  # [m <= n, N+1]
        return self.policy.build(state.root, rows, max_depth, budget, symbols=self.draft.symbol_tokens())

    def describe(self):
        return {**super().describe(), "architecture": "ar", "levels": self.levels,
                "min_path_prob": self.min_path_prob}
