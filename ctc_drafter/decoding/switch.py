"""When to speculate: measured per request, so that speculation never runs slower than plain decoding.

A speculative step pays the proposer (the draft's layers, tree building) and a wider base pass; it
wins only while enough of its tokens are accepted. Acceptance varies within a reply (a copied
passage, then fresh prose) and from prompt to prompt, and what a step costs varies from machine to
machine, so the switch compares the two rates actually measured in this request:

    speculative rate  tokens emitted / wall time over the last WINDOW speculative steps
                      (proposer, tree pass, acceptance and the proposer's update all counted)
    vanilla rate      the same over the last WINDOW plain 1-token steps (PROBE of them are run once,
                      after the first WINDOW speculative steps, when none has been measured yet)

While speculation is slower it is turned off for a stretch of plain steps (OFF_MIN, doubling on each
consecutive loss up to OFF_MAX, back to OFF_MIN after a win), then tried again on fresh steps. The
tokens are the base's own either way (a plain step is the vanilla loop's step), so greedy output is
unchanged; only the timing of the decision depends on the machine.
"""

from __future__ import annotations

from collections import deque

WINDOW = 4  # steps per rate estimate
PROBE = 2  # plain steps that measure the vanilla rate when none has been measured yet
OFF_MIN, OFF_MAX = 8, 256  # plain steps after a loss: OFF_MIN, doubled per consecutive loss


class SpeculationSwitch:
    """`speculate()` before each step says which kind to run; `record()` after it says what it gave."""

    def __init__(self, window: int = WINDOW, probe: int = PROBE, off_min: int = OFF_MIN, off_max: int = OFF_MAX):
        self.window, self.probe, self.off_min, self.off_max = window, probe, off_min, off_max
        self.spec: deque[tuple[int, float]] = deque(maxlen=window)  # (tokens, seconds) per speculative step
        self.plain: deque[tuple[int, float]] = deque(maxlen=window)
        self.plain_left = 0  # plain steps to run before speculating again
        self.off = off_min  # length of the next stretch of plain steps

    def speculate(self) -> bool:
        return self.plain_left <= 0

    def record(self, speculative: bool, tokens: int, seconds: float) -> None:
        if not speculative:
            self.plain.append((tokens, seconds))
            self.plain_left -= 1
            return
        self.spec.append((tokens, seconds))
        if len(self.spec) < self.window:
            return
        if not self.plain:  # nothing to compare with yet: measure a few plain steps
            self.plain_left = self.probe
            return
        if _rate(self.spec) < _rate(self.plain):
            self.plain_left, self.off = self.off, min(2 * self.off, self.off_max)
            self.spec.clear()  # judge the next try on its own steps
        else:
            self.off = self.off_min


def _rate(steps) -> float:
    """Tokens per second over the steps (a ratio of sums: a long step weighs by its length)."""
    seconds = sum(s for _, s in steps)
    return sum(t for t, _ in steps) / seconds if seconds > 0 else float("inf")
