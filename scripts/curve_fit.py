"""How much data a target beta would take if a learning curve kept its trend: beta against log2(trained
positions), fitted per variant and node budget, read from the table `scripts/learning_curve.py` writes.

    python scripts/curve_fit.py docs/benchmarks/learning_curve.md --target 4=2.0 --target 64=3.0

Why: the acceptance targets are missed at the data sizes measured, and "more data" is only an answer
with a number: beta per doubling of the data (least squares over every size, and the last doubling
alone, since a curve that bends up makes the fit pessimistic), and the positions at which each trend
reaches the target. An extrapolation, not a measurement: it says how far off a target is at the rate
measured, not that the rate holds.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import numpy as np


def read_curve(path: Path) -> dict[str, dict[int, list[tuple[int, float]]]]:
    """variant -> budget -> [(positions, beta)] sorted by positions, from a learning_curve.py table."""
    budgets, out = None, {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if budgets is None:
            if cells[:3] == ["variant", "subset size", "positions in the subset"]:
                budgets = [int(re.search(r"\d+", c).group()) for c in cells[3:]]
            continue
        if len(cells) != 3 + len(budgets) or not cells[2].isdigit():
            continue  # the separator, the reference row, or the end of the table
        for b, v in zip(budgets, cells[3:]):
            out.setdefault(cells[0], {}).setdefault(b, []).append((int(cells[2]), float(v)))
    if budgets is None:
        raise SystemExit(f"curve_fit: no learning_curve.py table in {path}")
    return {v: {b: sorted(p) for b, p in per.items()} for v, per in out.items()}


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(intercept, slope per doubling) of beta = a + b * log2(positions), least squares."""
    x = np.log2([p for p, _ in points])
    slope, intercept = np.polyfit(x, [v for _, v in points], 1)
    return float(intercept), float(slope)


def positions_for(target: float, intercept: float, slope: float) -> float:
    """Positions where the fitted line reaches target (inf if it never rises)."""
    return 2 ** ((target - intercept) / slope) if slope > 0 else math.inf


def fmt_positions(p: float) -> str:
    if math.isinf(p):
        return "never (flat)"
    return f"{p / 1e6:,.1f} M" if p >= 1e6 else f"{p / 1e3:,.0f} k"


def table(curve: dict, targets: dict[int, float]) -> list[str]:
    lines = ["| variant | nodes | sizes | beta at the largest | beta per doubling (fit) | last doubling | "
             "target | positions to reach it (fit) | (last doubling's rate) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for variant in sorted(curve):
        for b, pts in sorted(curve[variant].items()):
            if len(pts) < 3:
                continue  # a capacity row, not a curve
            a, s = fit(pts)
            (p0, v0), (p1, v1) = pts[-2], pts[-1]
            last = (v1 - v0) / math.log2(p1 / p0)
            t = targets.get(b)
            reach = fmt_positions(positions_for(t, a, s)) if t else ""
            reach_last = fmt_positions(positions_for(t, v1 - last * math.log2(p1), last)) if t else ""
            lines.append(f"| {variant} | {b} | {len(pts)}: {pts[0][0]:,}-{p1:,} | {v1:.3f} | {s:+.3f} | "
                         f"{last:+.3f} | {t if t else ''} | {reach} | {reach_last} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("curve", type=Path, help="a curve.md written by scripts/learning_curve.py")
    ap.add_argument("--target", action="append", default=[], metavar="NODES=BETA",
                    help="a target beta at a node budget, e.g. 4=2.0 (repeatable)")
    a = ap.parse_args()
    if not a.curve.is_file():
        sys.exit(f"curve_fit: no such file: {a.curve}")
    targets = {}
    for t in a.target:
        m = re.fullmatch(r"(\d+)=(\d+(?:\.\d+)?)", t)
        if not m:
            sys.exit(f"curve_fit: --target takes NODES=BETA (e.g. 4=2.0), got {t!r}")
        targets[int(m.group(1))] = float(m.group(2))
    print("\n".join(table(read_curve(a.curve), targets)))


if __name__ == "__main__":
    main()
