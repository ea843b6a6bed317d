"""Training throughput: trained positions per second of `ctc-drafter train` on a synthetic distill folder.

    OMP_NUM_THREADS=1 python scripts/train_speed.py [--repeat 3] [--dtype float32] [--steps 24] \
        [--work /tmp/ctc-train-speed] [--no-hidden] [-- any other train options, e.g. --loader-workers 0]

Builds (once, cached in --work) a distill folder for the embedded default base (hidden 576, vocab 49152):
random prompt tokens, the base's own greedy targets and, unless --no-hidden, its hidden states stored
as `distill --save-hidden` stores them, so no real distilled data is needed. Then runs the real command
--repeat times in fresh processes (one epoch, no held-out split, proposal vocabulary 8192 by default)
and reads log.jsonl: each step line's seq_per_s times --positions is positions/s (every synthetic
sequence has more trainable positions than --positions). The first logged window (warm-up) is
dropped; a run's figure is the median of the others. Prints each run and the median, with the CPU,
threads and load average: on a shared machine wall-clock figures move with what else runs (positions
per CPU second of the run's processes, start-up included, moves less). To measure another version
of the code, run the same script with PYTHONPATH pointing at that checkout.
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


def build_data(args, folder: Path) -> Path:
    """A distilled folder: random prompts, the base's greedy targets, loss mask on each sequence's second half."""
    import torch

    from ctc_drafter.data.shards import Sequence, write_manifest, write_shard
    from ctc_drafter.models.base import load_base_model

    if (folder / "manifest.json").is_file():
        return folder
    base = load_base_model(args.base_model, device="cpu", dtype="float32")
    g = torch.Generator().manual_seed(0)
    vocab = int(base.config.vocab_size)
    seqs = []
    for _ in range(args.sequences):
        ids = torch.randint(0, vocab, (args.length,), generator=g)
        with torch.no_grad():
            h, logits = base.forward(ids[None], None)
        mask = torch.zeros(args.length, dtype=torch.bool)
        mask[args.length // 2: args.length - 1] = True  # far more trainable positions than --positions
        seqs.append(Sequence(ids, logits[0].argmax(-1), mask, None if args.no_hidden else h[0].half()))
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(0, len(seqs), 16):
        write_shard(folder / f"shard_{s // 16:05d}.safetensors", seqs[s: s + 16])
    write_manifest(folder, {"format": 1, "base": base.signature(), "template": "auto", "mode": "synthetic",
                            "total": {"sequences": len(seqs)}})
    return folder


def one_run(args, data: Path, extra: list[str], out: Path) -> dict:
    """One training run in a fresh process; positions/s per logged window after the first."""
    cmd = [sys.executable, "-m", "ctc_drafter", "train", "--base-model", args.base_model, "--data", str(data),
           "--out", str(out), "--overwrite", "--epochs", "1", "--eval-frac", "0", "--bs", str(args.bs),
           "--positions", str(args.positions), "--log-every", str(args.log_every), "--device", "cpu",
           "--dtype", args.dtype, "--draft-vocab", str(args.draft_vocab), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    load0 = os.getloadavg()[0]
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    # cwd outside any checkout: `-m` puts the cwd first on sys.path, and PYTHONPATH must pick the code
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out.parent)
    if r.returncode != 0:
        raise SystemExit(f"train failed ({r.returncode}):\n{r.stderr[-3000:]}")
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)  # the run and its loader workers
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["event"] == "step"][1:]  # first window: warm-up (allocations, first reads)
    rates = [s["seq_per_s"] * args.positions for s in steps]
    return {"positions_per_s": round(statistics.median(rates), 1), "windows": [round(x, 1) for x in rates],
            # less sensitive to other jobs than wall time, but it includes the start-up (imports, base load)
            "positions_per_cpu_s_whole_run": round(args.steps * args.bs * args.positions / cpu_s, 1),
            "loss_last": round(steps[-1]["loss"], 4), "load_before": round(load0, 2),
            "load_after": round(os.getloadavg()[0], 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-model", default="default")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "ctc-train-speed"))
    p.add_argument("--length", type=int, default=256, help="tokens per synthetic sequence")
    p.add_argument("--no-hidden", action="store_true", help="store no hidden states: each step runs the base")
    p.add_argument("--steps", type=int, default=24, help="steps of the one epoch (sequences = steps x bs)")
    p.add_argument("--bs", type=int, default=4)
    p.add_argument("--positions", type=int, default=32)
    p.add_argument("--log-every", type=int, default=4)
    p.add_argument("--draft-vocab", type=int, default=8192)
    p.add_argument("--dtype", default="float32", help="train --dtype (auto, float32, bfloat16)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--repeat", type=int, default=3)
    args, extra = p.parse_known_args()
    extra = [x for x in extra if x != "--"]
    args.sequences = args.steps * args.bs
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = build_data(args, work / f"data_{args.sequences}x{args.length}{'_nohidden' if args.no_hidden else ''}")
    runs = []
    for i in range(args.repeat):
        runs.append(one_run(args, data, extra, work / f"ckpt_{os.getpid()}"))
        print(json.dumps({"run": i + 1, **runs[-1]}), flush=True)
    print(json.dumps({"positions_per_s_median": statistics.median(r["positions_per_s"] for r in runs),
                      "positions_per_cpu_s_median": statistics.median(r["positions_per_cpu_s_whole_run"] for r in runs),
                      "dtype": args.dtype, "threads": args.threads, "stored_hidden": not args.no_hidden,
                      "bs": args.bs, "positions": args.positions, "draft_vocab": args.draft_vocab, "extra": extra,
                      "cpu": cpu_model(), "code": os.environ.get("PYTHONPATH", str(ROOT))}))


if __name__ == "__main__":
    main()
