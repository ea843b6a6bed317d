"""The speculation switch: plain steps while speculation measures slower, the same tokens either way."""

import pytest
import torch

from conftest import tiny_llama
from ctc_drafter.decoding import CTCDrafter, CTCProposer, NgramProposer, Proposer, UnionProposer, make_proposer
from ctc_drafter.decoding.switch import SpeculationSwitch
from ctc_drafter.draft import new_ar_draft_for, new_draft_for
from ctc_drafter.models.base import BaseModel
from test_exactness import hf_greedy


def feed(switch, arm, tokens, seconds, times=1):
    for _ in range(times):
        assert switch.choose() == arm
        switch.record(arm, tokens, seconds)


def test_switch_runs_plain_steps_while_speculation_is_slower_and_backs_off():
    s = SpeculationSwitch(("full", "plain"), window=4, probe=2, off_min=8, off_max=32)
    feed(s, "full", 1, 0.10, times=4)  # speculation: 10 tok/s
    feed(s, "plain", 1, 0.05, times=2)  # the first try of plain steps: 20 tok/s
    feed(s, "plain", 1, 0.05, times=8)  # speculation lost: tried again after 8 steps
    feed(s, "full", 1, 0.10, times=4)  # a fresh window of 4, still slower -> 16 plain steps (doubled)
    feed(s, "plain", 1, 0.05, times=16)
    feed(s, "full", 3, 0.10, times=4)  # now 30 tok/s: speculation takes over again
    assert s.off["full"] == 8  # a win resets its back-off
    feed(s, "full", 3, 0.10, times=8)
    feed(s, "plain", 1, 0.05, times=2)  # plain lost its place: tried after 8 steps, loses
    feed(s, "full", 3, 0.10, times=16)  # ... and is tried next after 16
    assert s.choose() == "plain"


def test_switch_keeps_speculating_when_it_pays():
    s = SpeculationSwitch(("full", "plain"), window=4, probe=2)
    feed(s, "full", 3, 0.10, times=4)
    feed(s, "plain", 1, 0.05, times=2)  # tried: 20 tok/s against 30
    feed(s, "full", 3, 0.10, times=8)
    feed(s, "plain", 1, 0.05, times=2)  # tried again after 8 steps, loses again
    feed(s, "full", 3, 0.10, times=16)  # ... and then only after 16


def test_a_stored_rate_takes_over_at_once_when_the_running_arm_slows():
    s = SpeculationSwitch(("full", "plain"), window=4, probe=2, off_min=100)
    feed(s, "full", 3, 0.10, times=4)
    feed(s, "plain", 1, 0.05, times=2)  # 20 tok/s, stored
    feed(s, "full", 1, 0.10, times=3)  # acceptance drops: 30 -> 15 tok/s over the last 4
    assert s.choose() == "plain"


def test_three_arms_each_tried_then_the_best_runs():
    s = SpeculationSwitch(("full", "cheap", "plain"), window=4, probe=2, off_min=50)
    feed(s, "full", 3, 0.10, times=4)  # 30 tok/s
    feed(s, "cheap", 2, 0.05, times=4)  # 40 tok/s: takes over
    feed(s, "cheap", 2, 0.05)  # the first step of the new running arm ...
    feed(s, "plain", 1, 0.05, times=2)  # ... then plain, still untried, is tried: 20 tok/s
    feed(s, "cheap", 2, 0.05, times=40)


def test_the_back_off_is_capped():
    s = SpeculationSwitch(("full", "plain"), window=1, probe=1, off_min=2, off_max=4)
    feed(s, "full", 1, 1.0)
    feed(s, "plain", 1, 0.1)
    for off in (2, 4, 4):
        feed(s, "plain", 1, 0.1, times=off)
        feed(s, "full", 1, 1.0)


class Alternating:
    """A switch that ignores time: runs its arms in a fixed cycle (e.g. 2 full steps, then 3 plain)."""

    def __init__(self, arms, pattern):
        assert set(pattern) <= set(arms)
        self.pattern, self.i = pattern, 0

    def choose(self):
        return self.pattern[self.i % len(self.pattern)]

    def record(self, arm, tokens, seconds):
        assert arm == self.choose()
        self.i += 1


class Recording(Proposer):
    """Wraps a proposer; reads the decode state from its own cursor and checks, at every propose, that the
    reads add up to exactly the sequence so far (tokens, and one hidden state per position before the root)."""

    def __init__(self, inner):
        self.inner, self.name, self.seen = inner, inner.name, []

    def _read(self, state):
        self.tokens += state.read_tokens(self)
        hidden, next_ids = state.read_hidden(self)
        if hidden is not None:
            assert next_ids == state.tokens[len(self.next_ids) + 1: len(self.next_ids) + 1 + len(next_ids)]
            self.hidden.append(hidden)
            self.next_ids += next_ids

    def start(self, state):
        self.tokens, self.hidden, self.next_ids = [], [], []
        self._read(state)
        self.inner.start(state)

    def propose(self, state, max_depth, budget):
        self._read(state)
        assert self.tokens == state.tokens, "the proposer missed or repeated tokens"
        hidden = torch.cat(self.hidden, 1)
        assert hidden.shape[1] == len(state.tokens) - 1  # one hidden state per input token before the root
        self.seen.append((list(state.tokens), hidden))
        return self.inner.propose(state, max_depth, budget)

    def feedback(self, tree, emitted):
        self.inner.feedback(tree, emitted)

    def finish(self, state):
        self.inner.finish(state)


def toy_drafter(arch, pattern):
    """A float64 toy base, a draft of `arch` (None, "nar", "ar"), and a switch that runs `pattern`."""
    base = BaseModel(tiny_llama(dtype=torch.float64, seed=1), None, "toy")
    draft = None if arch is None else (new_ar_draft_for if arch == "ar" else new_draft_for)(base, seed=0)
    return base, draft, lambda arms: Alternating(arms, pattern)


def check_lossless_and_caught_up(base, drafter, rec):
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 3, 1, 4, 1]])
    spec = drafter.generate(ids, max_new_tokens=40)
    assert spec.tokens == drafter.generate(ids, max_new_tokens=40, speculative=False).tokens \
        == hf_greedy(base.model, ids, 40)
    assert sum(spec.arm_steps.values()) == spec.steps - 1 and len(spec.tree_sizes) == spec.steps - 1 - spec.plain_steps
    # what the proposer holds when it proposes is what one pass of the base over the context gives
    assert len(rec.seen) > 3
    context, hidden = rec.seen[-1]
    full, _ = base.forward(torch.tensor([context[:-1]]), None)
    torch.testing.assert_close(hidden, full, rtol=1e-9, atol=1e-9)
    return spec


@pytest.mark.parametrize("proposer,arch", [("ctc", "nar"), ("ctc", "ar"), ("ngram", None)])
def test_plain_steps_between_speculative_ones_are_lossless_and_the_proposer_catches_up(proposer, arch):
    base, draft, switch = toy_drafter(arch, ["full", "full", "plain", "plain", "plain"])
    rec = Recording(make_proposer(proposer, draft, "prefix"))
    spec = check_lossless_and_caught_up(base, CTCDrafter(base, draft, budget=8, proposer=rec, switch=switch), rec)
    assert spec.plain_steps > 0 and max(spec.accept_lengths) > 1


def test_the_hybrid_without_its_draft_on_some_steps_is_lossless_and_the_draft_catches_up():
    base, draft, switch = toy_drafter("nar", ["full", "cheap", "cheap", "full", "cheap", "full"])
    rec = Recording(CTCProposer(draft, "prefix"))  # the draft inside the union: skipped on cheap and plain steps
    hybrid = UnionProposer([rec, NgramProposer()], name="hybrid")
    assert hybrid.modes == ("full", "cheap")
    spec = check_lossless_and_caught_up(base, CTCDrafter(base, draft, budget=8, proposer=hybrid, switch=switch), rec)
    assert spec.arm_steps["cheap"] > 0
    assert len(rec.seen) == spec.arm_steps["full"]  # the draft ran on full steps only


def test_arms_plain_steps_only_where_no_mode_is_nearly_free(toy_base):
    draft = new_draft_for(toy_base, seed=0)
    assert CTCDrafter(toy_base, draft, proposer="ctc").arms() == ("full", "plain")
    # n-gram lookup with no match proposes a root-only tree, run as a plain step: no plain arm
    assert CTCDrafter(toy_base, draft, proposer="hybrid").arms() == ("full", "cheap")
    assert CTCDrafter(toy_base, None, proposer="ngram").arms() == ("full",)  # nothing to switch between
    assert CTCDrafter(toy_base, None, proposer="ngram").generate([1, 2, 3], max_new_tokens=5).arm_steps == {}


def test_sampling_speculates_on_every_step():
    base, draft, switch = toy_drafter("nar", ["full"] + ["plain"] * 5)
    drafter = CTCDrafter(base, draft, proposer="ctc", tree_policy="prefix", budget=4, switch=switch)
    out = drafter.generate(torch.tensor([[3, 1, 4]]), max_new_tokens=20, temperature=1.0, seed=5)
    assert out.plain_steps == 0  # a seed gives the same text whatever the machine's timing
    greedy = drafter.generate(torch.tensor([[3, 1, 4]]), max_new_tokens=20)
    assert greedy.plain_steps > 0
    drafter.adaptive = False
    assert drafter.generate(torch.tensor([[3, 1, 4]]), max_new_tokens=20).plain_steps == 0


class FakeClock:
    """Seconds that pass only in base passes: 10 ms, plus 100 ms per tree node after the first (a pass
    whose cost grows steeply with its width, where plain steps are the faster way)."""

    def __init__(self, base):
        self.now, forward = 0.0, base.forward

        def timed_forward(input_ids, *a, **kw):
            self.now += 0.010 + 0.100 * (input_ids.shape[1] - 1) * (kw.get("attention_mask") is not None)
            return forward(input_ids, *a, **kw)

        base.forward = timed_forward

    def __call__(self) -> float:
        return self.now


def test_the_real_switch_drives_generate_on_a_fake_clock():
    base, draft, _ = toy_drafter("nar", [])
    arms_taken = []

    def logged_switch(arms):
        switch = SpeculationSwitch(arms)  # the real one, its default window, probe and back-off
        choose = switch.choose
        switch.choose = lambda: arms_taken.append(choose()) or arms_taken[-1]
        return switch

    drafter = CTCDrafter(base, draft, proposer="ctc", tree_policy="prefix", budget=4, switch=logged_switch,
                         clock=FakeClock(base))
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    res = drafter.generate(ids, max_new_tokens=60)
    assert res.tokens == hf_greedy(base.model, ids, 60)
    # a window of 4 speculative steps; plain tried for 2 and faster, so it runs; speculation is tried again
    # after 8 steps (OFF_MIN), loses again, and next waits 16
    assert arms_taken[:34] == ["full"] * 4 + ["plain"] * 10 + ["full"] * 4 + ["plain"] * 16
    assert res.arm_steps == {a: arms_taken.count(a) for a in ("full", "plain")} and res.wall_s > 0
