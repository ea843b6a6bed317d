"""The speculation switch: plain steps while speculation measures slower, the same tokens either way."""

import pytest
import torch

from conftest import tiny_llama
from ctc_drafter.decoding import CTCDrafter, Proposer, make_proposer
from ctc_drafter.decoding import generate as generate_module
from ctc_drafter.decoding.switch import SpeculationSwitch
from ctc_drafter.draft import new_ar_draft_for, new_draft_for
from ctc_drafter.models.base import BaseModel
from test_exactness import hf_greedy


def feed(switch, speculative, tokens, seconds, times=1):
    for _ in range(times):
        assert switch.speculate() == speculative
        switch.record(speculative, tokens, seconds)


def test_switch_turns_speculation_off_while_it_is_slower_and_backs_off():
    s = SpeculationSwitch(window=4, probe=2, off_min=8, off_max=32)
    feed(s, True, 1, 0.10, times=4)  # speculation: 10 tok/s
    feed(s, False, 1, 0.05, times=2)  # the probe: plain steps, 20 tok/s
    feed(s, True, 1, 0.10)  # judged against the probe: slower -> 8 plain steps
    feed(s, False, 1, 0.05, times=8)
    feed(s, True, 1, 0.10, times=4)  # a fresh window of 4, still slower -> 16 plain steps (doubled)
    feed(s, False, 1, 0.05, times=16)
    feed(s, True, 3, 0.10, times=4)  # now 30 tok/s: speculation stays on
    feed(s, True, 3, 0.10, times=20)
    assert s.off == 8  # a win resets the back-off


def test_switch_keeps_speculating_when_it_pays():
    s = SpeculationSwitch(window=4, probe=2)
    feed(s, True, 3, 0.10, times=4)
    feed(s, False, 1, 0.05, times=2)  # probe: 20 tok/s against 30
    feed(s, True, 3, 0.10, times=100)


def test_the_back_off_is_capped():
    s = SpeculationSwitch(window=1, probe=1, off_min=2, off_max=4)
    feed(s, True, 1, 1.0)
    feed(s, False, 1, 0.1)
    for off in (2, 4, 4):
        feed(s, True, 1, 1.0)
        feed(s, False, 1, 0.1, times=off)


class Alternating:
    """A switch that ignores time: speculate `on` steps, then `off` plain ones, over and over."""

    def __init__(self, on=2, off=3):
        self.pattern, self.i = [True] * on + [False] * off, 0

    def speculate(self):
        return self.pattern[self.i % len(self.pattern)]

    def record(self, speculative, tokens, seconds):
        assert speculative == self.speculate()
        self.i += 1


class Recording(Proposer):
    """Wraps a proposer; checks that at every propose it has been told exactly the context so far."""

    def __init__(self, inner):
        self.inner, self.name, self.seen = inner, inner.name, []

    def start(self, prompt_ids, prompt_hidden, first_token):
        self.tokens, self.hidden = list(prompt_ids) + [first_token], [prompt_hidden]
        self.inner.start(prompt_ids, prompt_hidden, first_token)

    def propose(self, context, root, max_depth, budget):
        assert self.tokens == list(context), "the proposer missed or repeated tokens"
        hidden = torch.cat(self.hidden, 1)
        assert hidden.shape[1] == len(context) - 1  # one hidden state per input token before the root
        self.seen.append((list(context), hidden))
        return self.inner.propose(context, root, max_depth, budget)

    def feedback(self, tree, emitted):
        self.inner.feedback(tree, emitted)

    def accept(self, new_tokens, path_hidden):
        assert path_hidden.shape[1] == len(new_tokens)
        self.tokens += new_tokens
        self.hidden.append(path_hidden)
        self.inner.accept(new_tokens, path_hidden)

    def finish(self):
        self.inner.finish()


@pytest.mark.parametrize("proposer,arch", [("ctc", "nar"), ("ctc", "ar"), ("ngram", None), ("hybrid", "nar")])
def test_plain_steps_between_speculative_ones_are_lossless_and_the_proposer_catches_up(monkeypatch, proposer, arch):
    monkeypatch.setattr(generate_module, "SpeculationSwitch", lambda: Alternating(on=2, off=3))
    base = BaseModel(tiny_llama(dtype=torch.float64, seed=1), None, "toy")
    draft = None if arch is None else (new_ar_draft_for if arch == "ar" else new_draft_for)(base, seed=0).bind(base.model)
    rec = Recording(make_proposer(proposer, draft, "prefix"))
    drafter = CTCDrafter(base, draft, budget=8, proposer=rec)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 3, 1, 4, 1]])
    spec = drafter.generate(ids, max_new_tokens=40)
    assert spec.tokens == drafter.generate(ids, max_new_tokens=40, speculative=False).tokens \
        == hf_greedy(base.model, ids, 40)
    assert spec.plain_steps > 0 and spec.tree_sizes and len(spec.tree_sizes) + spec.plain_steps == spec.steps - 1
    # what the proposer holds after plain steps is what one pass of the base over the context gives
    context, hidden = rec.seen[-1]
    full, _ = base.forward(torch.tensor([context[:-1]]), None)
    torch.testing.assert_close(hidden, full, rtol=1e-9, atol=1e-9)


def test_sampling_speculates_on_every_step(monkeypatch):
    monkeypatch.setattr(generate_module, "SpeculationSwitch", lambda: Alternating(on=1, off=5))
    base = BaseModel(tiny_llama(dtype=torch.float64, seed=1), None, "toy")
    drafter = CTCDrafter(base, new_draft_for(base, seed=0), generator="prefix", budget=4)
    out = drafter.generate(torch.tensor([[3, 1, 4]]), max_new_tokens=20, temperature=1.0, seed=5)
    assert out.plain_steps == 0  # a seed gives the same text whatever the machine's timing
    greedy = drafter.generate(torch.tensor([[3, 1, 4]]), max_new_tokens=20)
    assert greedy.plain_steps > 0
    drafter.adaptive = False
    assert drafter.generate(torch.tensor([[3, 1, 4]]), max_new_tokens=20).plain_steps == 0
