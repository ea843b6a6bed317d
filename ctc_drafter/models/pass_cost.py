"""What one base verification pass costs on this machine, as a function of the tree's node count.

Built from the whole-pass timings that `kernel_choice.py` takes at first load (and caches), for the
kernel plan actually in use. A proposer that sizes its tree per step asks `marginal_ms(n)` (what one
more node costs) and compares it with the expected gain; `best_budget` picks the node count that
maximises expected tokens per millisecond for a given acceptance curve.

    cost = PassCostModel({1: 41.0, 4: 52.0, 16: 60.0, 64: 110.0})   # nodes -> ms
    cost.pass_ms(6)        # 53.3: piecewise linear between measured sizes
    cost.marginal_ms(6)    # 0.67: pass_ms(7) - pass_ms(6)
    cost.best_budget(lambda n: 1 + 0.5 * (1 - 0.7 ** (n - 1)))  # argmax_n E[tokens](n) / pass_ms(n)

Measured costs are made non-decreasing in n (a running maximum): a larger pass that timed faster than
a smaller one is noise on a shared machine, and a negative marginal cost would make a proposer grow
trees for free.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping


class PassCostModel:
    """Cost in ms of one base pass over n new tokens (tree nodes, root included), at the measured past length."""

    def __init__(self, points: Mapping[int, float], past: int | None = None):
        if not points:
            raise ValueError("PassCostModel needs at least one measured (nodes, ms) point")
        sizes = sorted(int(n) for n in points)
        if sizes[0] < 1:
            raise ValueError(f"node counts must be >= 1, got {sizes[0]}")
        ms, running = [], 0.0
        for n in sizes:
            running = max(running, float(points[n]))
            ms.append(running)
        self.sizes, self.ms = sizes, ms  # ascending, non-decreasing
        self.past = past  # KV length the passes were timed on (None: unknown)

    def pass_ms(self, n: float) -> float:
        """Interpolated cost of a pass over n nodes; flat below the smallest measured size, the last
        segment's slope beyond the largest."""
        s, c = self.sizes, self.ms
        if n <= s[0] or len(s) == 1:
            return c[0] if n <= s[0] else c[0] * n / s[0]
        i = min(bisect.bisect_left(s, n), len(s) - 1)  # s[i-1] < n <= s[i], or the last segment
        x0, x1, y0, y1 = s[i - 1], s[i], c[i - 1], c[i]
        return y0 + (y1 - y0) * (n - x0) / (x1 - x0)

    def marginal_ms(self, n: int) -> float:
        """What growing a pass from n to n + 1 nodes costs (>= 0)."""
        return self.pass_ms(n + 1) - self.pass_ms(n)

    def best_budget(self, expected_tokens: Callable[[int], float], max_nodes: int = 64,
                    overhead_ms: float = 0.0) -> int:
        """The node count n in 1..max_nodes maximising expected_tokens(n) / (pass_ms(n) + overhead_ms).

        expected_tokens(n): tokens a step emits on average with an n-node tree (1.0 at n = 1: the
        base's own token); overhead_ms: per-step cost outside the base pass (the draft, tree building).
        Ties go to the smaller tree.
        """
        best, best_rate = 1, float("-inf")
        for n in range(1, max_nodes + 1):
            rate = expected_tokens(n) / (self.pass_ms(n) + overhead_ms)
            if rate > best_rate * (1 + 1e-9):
                best, best_rate = n, rate
        return best

    def to_dict(self) -> dict:
        return {"past": self.past, "nodes_ms": {str(n): round(m, 3) for n, m in zip(self.sizes, self.ms)}}

    @classmethod
    def from_dict(cls, d: dict) -> "PassCostModel":
        return cls({int(n): m for n, m in d["nodes_ms"].items()}, past=d.get("past"))

    def __repr__(self) -> str:
        pts = ", ".join(f"{n}: {m:.1f}" for n, m in zip(self.sizes, self.ms))
        return f"PassCostModel({{{pts}}} ms, past {self.past})"
