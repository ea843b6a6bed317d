"""Two methods compared question by question: the ratio of their beta (or tokens/s) over the questions both
answered, with a bootstrap interval over questions.

    python scripts/paired_ratio.py runs/bench14/b4/p1 runs/bench14/b4/p2 \
        --pair arctc-prefix-always/ar-prefix-always --pair ar-prefix-always/ce-prefix-always [--metric beta]

Why: drafts that give the base's own text answer the same questions with the same tokens, so their
difference is in the steps (beta) or the time (tokens/s) per question; resampling questions says whether
a whole-bench ratio such as 1.005 is a difference or a tie. beta = tokens / base passes over all turns
(prefill included, as `report` counts it); tokens/s = tokens / wall time.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from ctc_drafter.evaluation.answer_files import method_records

METRICS = ("beta", "tokens_per_s")


def per_question(dirs: list[Path], method: str, metric: str) -> dict:
    """question_id -> (tokens, steps or wall seconds) over all turns, from every dir's `<method>.jsonl`."""
    out = {}
    for r in method_records(dirs, method):
        c = r["choices"][0]
        if metric == "beta":
            acc = c.get("accept_lengths") or []
            out[r["question_id"]] = (sum(sum(t) for t in acc), sum(len(t) for t in acc))
        else:
            out[r["question_id"]] = (sum(c["new_tokens"]), sum(c["wall_time"]))
    return out


def ratio(a: dict, b: dict, qids: list) -> float:
    """(sum tokens / sum denominators) of a over the same of b, on qids."""
    rate = lambda s: sum(s[q][0] for q in qids) / sum(s[q][1] for q in qids)  # noqa: E731
    return rate(a) / rate(b)


def paired(a: dict, b: dict, resamples: int = 2000, seed: int = 0) -> tuple[int, float, float, float]:
    """(questions, ratio, low, high): the ratio over the common questions and its 95 % bootstrap interval."""
    common = sorted(set(a) & set(b), key=str)
    if not common:
        raise ValueError("the two methods have no question in common")
    rng = random.Random(seed)
    boots = sorted(ratio(a, b, [rng.choice(common) for _ in common]) for _ in range(resamples))
    return len(common), ratio(a, b, common), boots[int(0.025 * resamples)], boots[int(0.975 * resamples) - 1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="folders holding <method>.jsonl answer files")
    ap.add_argument("--pair", action="append", required=True, metavar="A/B", help="methods to compare (repeatable)")
    ap.add_argument("--metric", default="beta", choices=METRICS)
    a = ap.parse_args()
    rows = []
    for pair in a.pair:
        names = pair.split("/")
        if len(names) != 2:
            ap.error(f"--pair {pair!r}: expected A/B")
        stats = [per_question(a.dirs, n, a.metric) for n in names]
        for n, s in zip(names, stats):
            if not s:
                ap.error(f"no answers of {n!r} in {', '.join(map(str, a.dirs))}")
        try:
            n, r, lo, hi = paired(*stats)
        except ValueError as e:
            ap.error(f"{pair}: {e}")
        rows.append(f"| {pair} | {n} | {r:.3f} | {lo:.3f}-{hi:.3f} |")
    print(f"| {a.metric} of A / B | questions | ratio | 95 % bootstrap over questions |")
    print("|---|---|---|---|")
    print("\n".join(rows))

if __name__ == "__main__":
    main()
