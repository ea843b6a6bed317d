"""How to speculate, step by step: measured per request, so that speculation never runs slower than
the cheaper ways of taking the next step.

A speculative step pays the proposer (the draft's layers, tree building) and a wider base pass; it
wins only while enough of its tokens are accepted. Acceptance varies within a reply (a copied
passage, then fresh prose) and from prompt to prompt, and what each part costs varies from machine
to machine, so the switch compares rates actually measured in this request between its arms:

    the proposer's modes, dearest first   e.g. the hybrid with its draft ("full"), then n-gram lookup
                                          alone ("cheap", no draft layers to run)
    "plain"                               the vanilla loop's 1-token step, unless a mode is nearly
                                          free (SpeculativeDecoder.arms: lookup that finds nothing already
                                          runs a plain step)

An arm's rate is tokens emitted / wall time over its last WINDOW steps (proposer, tree pass,
acceptance and the proposer's update all counted; PROBE steps for "plain", whose steps vary little).
The request starts on the first arm; once its window is full, each other arm is tried once for its
own window. The best measured arm runs; a stored rate that beats the running arm's takes over at
once. An arm that loses is tried again after OFF_MIN steps, doubling on each further loss up to
OFF_MAX, back to OFF_MIN once it wins. The tokens are the base's own on every arm (each is exact),
so greedy output is unchanged; only the timing of the decisions depends on the machine.
"""

from __future__ import annotations

from collections import deque

WINDOW = 4  # steps per rate estimate of a speculative arm
PROBE = 2  # steps per rate estimate of the plain arm
OFF_MIN, OFF_MAX = 8, 256  # steps before a losing arm is tried again: OFF_MIN, doubled per further loss
PLAIN = "plain"


class SpeculationSwitch:
    """`choose()` before each step names the arm to run; `record()` after it says what it gave."""

    def __init__(self, arms: tuple[str, ...] = ("full", PLAIN), window: int = WINDOW, probe: int = PROBE,
                 off_min: int = OFF_MIN, off_max: int = OFF_MAX):
        self.arms, self.off_min, self.off_max = tuple(arms), off_min, off_max
        self.steps = {a: deque(maxlen=probe if a == PLAIN else window) for a in self.arms}
        self.current = self.arms[0]
        self.trial: str | None = None  # an arm being tried, and its steps still to run
        self.trial_left = 0
        self.t = 0  # steps recorded
        self.retry_at = {a: 0 for a in self.arms}  # step count from which a non-running arm is tried again
        self.off = {a: off_min for a in self.arms}

    def choose(self) -> str:
        return self.trial or self.current

    def record(self, arm: str, tokens: int, seconds: float) -> None:
        self.t += 1
        self.steps[arm].append((tokens, seconds))
        if self.trial is not None:
            self.trial_left -= 1
            if self.trial_left <= 0:
                tried, self.trial = self.trial, None
                if self.rate(tried) > self.rate(self.current):
                    self._lose(self.current)
                    self.current, self.off[tried] = tried, self.off_min
                else:
                    self._lose(tried)
            return
        if len(self.steps[arm]) < self.steps[arm].maxlen:
            return
        due = [a for a in self.arms if a != arm and self.t >= self.retry_at[a]]
        if due:  # try it on fresh steps
            self.trial, self.trial_left = due[0], self.steps[due[0]].maxlen
            self.steps[due[0]].clear()
            return
        best = max((a for a in self.arms if a != arm and self.steps[a]), key=self.rate, default=None)
        if best is not None and self.rate(best) > self.rate(arm):
            self._lose(arm)
            self.current = best
        else:
            self.off[arm] = self.off_min

    def _lose(self, arm: str) -> None:
        self.retry_at[arm] = self.t + self.off[arm]
        self.off[arm] = min(2 * self.off[arm], self.off_max)  # its steps stay: a stored rate to compare with

    def rate(self, arm: str) -> float:
        """Tokens per second over the arm's recent steps (a ratio of sums: a long step weighs by its length)."""
        steps = self.steps[arm]
        seconds = sum(s for _, s in steps)
        return sum(t for t, _ in steps) / seconds if seconds > 0 else (float("inf") if steps else 0.0)
