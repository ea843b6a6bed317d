"""Tokens/s of each method per window of questions, from a benchmark run's answer files.

    python scripts/window_table.py runs/bench/gsm8k/p1 runs/bench/gsm8k/p2 \
        --methods hf-generate,ctc-prefix,ngram,hybrid --window 10 --ratio hybrid/ngram \
        [--span 0-119 --span 120-199]

`benchmark.py` answers every method on a window before the next starts, so within a window the methods
ran back to back under the same load; this table shows how much a whole-run ratio moves from window
to window (and over spans run at different times), which the single summary figure hides.
tokens/s = sum of new tokens / sum of wall time over the window's questions (as `report` computes it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ctc_drafter.evaluation.answer_files import method_records


def per_question(dirs: list[Path], method: str) -> dict[int, tuple[int, float]]:
    """question_id -> (new tokens, wall seconds) over all turns, from every dir's `<method>.jsonl`."""
    out = {}
    for r in method_records(dirs, method):
        c = r["choices"][0]
        out[r["question_id"]] = (sum(c["new_tokens"]), sum(c["wall_time"]))
    return out


def rate(stats: dict[int, tuple[int, float]], qids) -> float:
    tok = sum(stats[q][0] for q in qids)
    wall = sum(stats[q][1] for q in qids)
    return tok / wall if wall else float("nan")


def span(text: str, ap) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split("-"))
    except ValueError:
        ap.error(f"--span {text!r}: expected FIRST-LAST, e.g. 0-119")
    return lo, hi


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="folders holding <method>.jsonl answer files")
    ap.add_argument("--methods", required=True, help="comma-separated method names (answer file stems)")
    ap.add_argument("--window", type=int, default=10, help="questions per row (in question-id order)")
    ap.add_argument("--ratio", default=None, metavar="A/B", help="add a column: tokens/s of A over B")
    ap.add_argument("--span", action="append", default=[], metavar="FIRST-LAST",
                    help="extra rows over question ids FIRST..LAST (inclusive); the whole run is always added")
    a = ap.parse_args()
    methods = a.methods.split(",")
    ratio = a.ratio.split("/") if a.ratio else None
    if ratio and (len(ratio) != 2 or not set(ratio) <= set(methods)):
        ap.error(f"--ratio {a.ratio!r}: expected A/B with both in --methods")
    stats = {m: per_question(a.dirs, m) for m in methods}
    missing = [m for m in methods if not stats[m]]
    if missing:
        ap.error(f"no answers for {', '.join(missing)} in {', '.join(map(str, a.dirs))}")
    common = sorted(set.intersection(*(set(s) for s in stats.values())))
    rows = [(f"{w[0]}-{w[-1]}", w) for w in (common[i:i + a.window] for i in range(0, len(common), a.window))]
    for text in a.span:
        lo, hi = span(text, ap)
        rows.append((f"**{lo}-{hi}**", [q for q in common if lo <= q <= hi]))
    rows.append((f"**all {len(common)}**", common))

    print("| questions | " + " | ".join(methods) + (f" | {ratio[0]} / {ratio[1]}" if ratio else "") + " |")
    print("|---" * (len(methods) + 1 + bool(ratio)) + "|")
    for label, qids in rows:
        if not qids:
            continue
        r = {m: rate(stats[m], qids) for m in methods}
        cells = [f"{r[m]:.2f}" for m in methods] + ([f"{r[ratio[0]] / r[ratio[1]]:.3f}"] if ratio else [])
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
