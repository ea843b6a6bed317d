"""scripts/replay_beta.py: replaying a draft against the base's greedy answer gives the accepted lengths a
real greedy speculative decode records, step for step, with the CTC transform on and off."""

import torch

from conftest import load_script, tiny_llama
from ctc_drafter.decoding import SpeculativeDecoder
from ctc_drafter.draft import new_eagle1_draft_for
from ctc_drafter.models.base import BaseModel
from test_exactness import hf_greedy


def test_replay_equals_the_real_decodes_accepted_lengths():
    rb = load_script("replay_beta")
    base = BaseModel(tiny_llama(seed=1), None, "toy")
    draft = new_eagle1_draft_for(base, seed=0)
    g = torch.Generator().manual_seed(0)
    longest = 0
    for transform in (True, False):
        d = SpeculativeDecoder(base, draft, proposer="ctc", ctc_transform=transform, adaptive=False)
        for _ in range(3):
            ids = torch.randint(0, 64, (1, 6), generator=g)
            answer = hf_greedy(base.model, ids, 30)
            real = d.generate(ids, max_new_tokens=30)
            assert real.tokens == answer
            hidden, not_greedy = rb.base_pass(base, ids[0].tolist(), answer)
            assert not_greedy == 0
            assert rb.replay_turn(d, ids[0].tolist(), answer, hidden, 30) == real.accept_lengths
            longest = max(longest, max(real.accept_lengths))
    assert longest > 1  # some step accepted draft tokens: the replay followed the tree, not only bonuses
