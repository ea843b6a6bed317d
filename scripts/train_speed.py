"""Training throughput: trained positions per second of `ctc-drafter train` on a synthetic distill folder
(or on a real one, --data).

    OMP_NUM_THREADS=1 python scripts/train_speed.py [--repeat 3] [--dtype float32] [--steps 24] \
        [--work /tmp/ctc-train-speed] [--no-hidden] [--positions 32|all] [--data DIR] \
        [-- any other train options, e.g. --loader-workers 0 or --arch ar]

Builds (once, cached in --work) a distill folder for the embedded default base (hidden 576, vocab 49152):
random prompt tokens, the base's own greedy targets and, unless --no-hidden, its hidden states stored
as `distill --save-hidden` stores them, so no real distilled data is needed. Then runs the real command
--repeat times in fresh processes (one epoch, no held-out split, proposal vocabulary 8192 by default)
and reads log.jsonl: a step line's trained positions times its seq_per_s over its sequences is
positions/s (older versions log no pos_per_s; this works for every version). With --data the epoch is
that folder's sequences (--no-hidden: a copy without its hidden states, made once in --work). The
first logged window (warm-up) is
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


def strip_hidden(src: Path, folder: Path) -> Path:
    """A copy of the distilled folder `src` without stored hidden states: `train` then runs the base."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if (folder / "manifest.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            save_file({k: f.get_tensor(k) for k in f.keys() if k != "hidden"}, str(folder / shard.name),
                      metadata=f.metadata())
    for other in src.iterdir():
        if other.is_file() and other.suffix != ".safetensors" and other.name != "manifest.json":
            (folder / other.name).write_bytes(other.read_bytes())
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["hidden"] = False
    manifest.get("options", {})["save_hidden"] = False
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))  # last: the copy is complete
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
    trained = sum(s["train"]["positions"] for s in steps if s["event"] == "epoch")
    steps = [s for s in steps if s["event"] == "step"][1:]  # first window: warm-up (allocations, first reads)
    rates = [s["positions"] * s["seq_per_s"] / (args.log_every * args.bs) for s in steps]
    return {"positions_per_s": round(statistics.median(rates), 1), "windows": [round(x, 1) for x in rates],
            # less sensitive to other jobs than wall time, but it includes the start-up (imports, base load)
            "positions_per_cpu_s_whole_run": round(trained / cpu_s, 1),
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
    p.add_argument("--positions", default="32", help="train --positions: a count or all")
    p.add_argument("--data", help="a distilled folder to train on instead of the synthetic one")
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
    if args.data:
        data = Path(args.data).resolve()
        if args.no_hidden:
            data = strip_hidden(data, work / f"{data.name}_nohidden")
    else:
        data = build_data(args, work / f"data_{args.sequences}x{args.length}{'_nohidden' if args.no_hidden else ''}")
    runs = []
    for i in range(args.repeat):
        runs.append(one_run(args, data, extra, work / f"ckpt_{os.getpid()}"))
        print(json.dumps({"run": i + 1, **runs[-1]}), flush=True)
    print(json.dumps({"positions_per_s_median": statistics.median(r["positions_per_s"] for r in runs),
                      "positions_per_cpu_s_median": statistics.median(r["positions_per_cpu_s_whole_run"] for r in runs),
                      "dtype": args.dtype, "threads": args.threads, "stored_hidden": not args.no_hidden,
                      "bs": args.bs, "positions": args.positions, "data": str(data), "draft_vocab": args.draft_vocab, "extra": extra,
                      "cpu": cpu_model(), "code": os.environ.get("PYTHONPATH", str(ROOT))}))


if __name__ == "__main__":
    main()
