"""Distillation throughput: trained (assistant) tokens per second of `ctc-drafter distill --mode regenerate`.

    OMP_NUM_THREADS=1 python scripts/distill_speed.py [--repeat 3] [--limit 32] [--max-new-tokens 128] \
        [--data ../shared/data/arena/question.jsonl] [-- any other distill options, e.g. --batch-size 64]

Runs the real command --repeat times into a scratch folder (--overwrite each time) and reads what the
shards record: their assistant tokens (the base's replies) and the seconds spent making them (generation
plus the labelling pass; the model load is outside). Prints each run and the median, with the CPU, the
process's CPU time and the load average: on a shared machine wall-clock figures move with what else runs. To measure another
version of the code, run the same script with PYTHONPATH pointing at that checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    from ctc_drafter.models.cpu_info import cpu_identity  # one home for "which CPU is this"

    return cpu_identity()["cpu"]


def one_run(args, extra: list[str], out: Path) -> dict:
    """One distill run in a fresh process; (tokens, seconds, agreement) from its shards."""
    cmd = [sys.executable, "-m", "ctc_drafter", "distill", "--base-model", args.base_model, "--data", *args.data,
           "--limit", str(args.limit), "--max-new-tokens", str(args.max_new_tokens), "--out", str(out),
           "--overwrite", "--json", *extra]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(cmd, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if done.returncode:
        sys.exit(f"distill failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    shards = [json.loads(p.read_text()) for p in sorted(out.glob("shard_*.json"))]
    tokens = sum(s["assistant_tokens"] for s in shards)
    seconds = sum(s["seconds"] for s in shards)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return {"tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds, "cpu_s": cpu,
            "agreement": summary["agreement"],
            "unfinished": summary["replies_unfinished"], "load": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--limit", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--base-model", default="default")
    ap.add_argument("--data", nargs="+", default=[str(ROOT.parent / "shared" / "data" / "arena" / "question.jsonl")])
    ap.add_argument("extra", nargs="*", help="more distill options, after --")
    args = ap.parse_args()
    print(f"cpu: {cpu_model()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
          f"distill options: {' '.join(args.extra) or '(defaults)'}", flush=True)
    rates = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeat):
            res = one_run(args, args.extra, Path(tmp) / "out")
            rates.append(res["tok_s"])
            print(f"run {r + 1}: {res['tokens']} tokens in {res['seconds']:.1f} s = {res['tok_s']:.1f} tok/s "
                  f"(process CPU time incl. model load {res['cpu_s']:.1f} s); "
                  f"agreement {res['agreement']}; {res['unfinished']} replies cut; load avg {res['load']:.2f}",
                  flush=True)
    print(f"median {statistics.median(rates):.1f} tok/s over {len(rates)} runs")


if __name__ == "__main__":
    main()
