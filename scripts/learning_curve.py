"""Learning curves: held-out beta of the draft against the number of trained positions (issue 12).

    python scripts/learning_curve.py --data DISTILL_1 [--data DISTILL_2 ...] --out runs/curve \
        [--sizes 16000,32000,64000,128000,256000] [--variants ctc,ce] [--epochs 4] [--budgets 4,16,64] \
        [--prompts 10] [--max-new-tokens 128] [--steps subset,train,measure,report] [-- more train options]

Steps (each resumes: finished pieces are skipped, so rerun the same command after a stop):
  subset   for each size, folders holding the first shards of every --data folder (symlinks and a cut
           manifest), the same share of each, at least `size` trained (assistant) positions in all;
  train    `ctc-drafter train` per (variant, size) with the same options (--epochs, and what follows `--`);
           variants: ctc (the NAR CTC draft), ce (its CE ablation), ar-ctc (the reference code's autoregressive
           head: feature regression + token CE + the CTC term), ar (the same without the CTC term, EAGLE-style),
           and any defined with --variant NAME="train options" (capacity: e.g. ctc-2layers="--loss ctc
           --config '{\"num_context_layers\": 2}'", ctc-L12="--loss ctc --frames 12");
  measure  real speculative decoding with each draft alone (`--proposer ctc`, the CPU default `prefix`
           policy) at each node budget on held-out prompts: the LAST --prompts questions of the arena file,
           which no distillation run here uses; greedy; beta = new tokens / base passes;
  report   curve.md (table, commands) and curve.png in --out.
Data folders still being written count their finished shards only. Never point --prompts at MT-bench or
GSM8K test: they are the measurement, not the tuning set.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARENA = ROOT.parent / "shared" / "data" / "arena" / "question.jsonl"


def shard_entries(folder: Path) -> tuple[dict, list[dict]]:
    manifest = json.loads((folder / "manifest.json").read_text())
    return manifest, [s for s in manifest.get("shards", []) if (folder / s["file"]).is_file()]


def make_subsets(a) -> dict[int, list[Path]]:
    """size -> subset folders (one per --data folder), the same fraction of each folder's finished shards:
    whole shards as symlinks, the last one cut to the sequences needed (a real shard file)."""
    from ctc_drafter.data.shards import read_shard, write_shard

    sources = [(Path(d).resolve(), *shard_entries(Path(d))) for d in a.data]
    total = sum(s.get("assistant_tokens", 0) for _, _, shards in sources for s in shards)
    out = {}
    for size in a.sizes:
        if size > total:
            print(f"size {size}: only {total} positions distilled so far; skipped", flush=True)
            continue
        folders = []
        for src, manifest, shards in sources:
            want, got, keep = size * sum(s.get("assistant_tokens", 0) for s in shards) / total, 0, []
            folder = Path(a.out) / "data" / str(size) / src.name
            folders.append(folder)
            if (folder / "manifest.json").is_file():
                continue
            folder.mkdir(parents=True, exist_ok=True)
            for s in shards:
                if got >= want:
                    break
                if got + s.get("assistant_tokens", 0) <= want:
                    link = folder / s["file"]
                    if not link.exists():
                        link.symlink_to(src / s["file"])
                    keep.append(s)
                    got += s.get("assistant_tokens", 0)
                    continue
                seqs, part = read_shard(src / s["file"]), []
                for q in seqs:  # the prefix of this shard's sequences that reaches the size
                    if got >= want:
                        break
                    part.append(q)
                    got += int(q.loss_mask.sum())
                write_shard(folder / s["file"], part)
                keep.append({**s, "sequences": len(part), "records": None, "cut": True,
                             "assistant_tokens": sum(int(q.loss_mask.sum()) for q in part)})
            cut = {**manifest, "shards": keep, "complete": True, "subset_of": str(src)}
            tmp = folder / "manifest.json.tmp"
            tmp.write_text(json.dumps(cut, indent=1))
            os.replace(tmp, folder / "manifest.json")
        out[size] = folders
    return out


VARIANTS = {"ctc": ["--loss", "ctc"], "ce": ["--loss", "ce"], "ar-ctc": ["--arch", "ar"],
            "ar": ["--arch", "ar", "--ctc-weight", "0"]}


def ckpt_dir(a, loss: str, size: int) -> Path:
    return Path(a.out) / "ckpt" / f"{loss}-{size}"


def trained(a, loss: str, size: int) -> bool:
    """The run logged its last epoch (an interrupted run's folder holds the previous epoch's draft too)."""
    log = ckpt_dir(a, loss, size) / "log.jsonl"
    if not log.is_file():
        return False
    for line in log.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r.get("event") == "epoch" and r.get("epoch") == a.epochs:
            return True
    return False


def train_command(a, loss: str, size: int, folders: list[Path]) -> list[str]:
    """`ctc-drafter train` for one (variant, size). The variant's options come after the shared ones (after
    `--`): argparse keeps the last value, so a capacity variant (e.g. --label-len 6) overrides the default."""
    out = ckpt_dir(a, loss, size)
    cmd = [sys.executable, "-m", "ctc_drafter", "train", "--base-model", a.base_model, "--out", str(out),
           "--epochs", str(a.epochs), "--seed", "0", *a.train_args, *VARIANTS[loss]]
    for f in folders:
        cmd += ["--data", str(f)]
    states = sorted(out.glob("state_*"), key=lambda p: int(p.name.split("_")[1])) if out.is_dir() else []
    if states:
        cmd += ["--recover", states[-1].name.split("_")[1]]
    return cmd


def train_one(a, loss: str, size: int, folders: list[Path]) -> None:
    if trained(a, loss, size):
        return
    cmd = train_command(a, loss, size, folders)
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def held_out_prompts(a) -> list[str]:
    lines = [json.loads(x) for x in Path(a.questions).read_text().split("\n") if x.strip()]  # not splitlines: U+2028 in text
    return [q["turns"][0] for q in lines[-a.prompts:]]


def held_out_beta(a, draft: str, prompts: list[str]) -> tuple[dict, str]:
    """{budget: beta} of `draft` alone (`prefix` policy) on the prompts, and the base dtype it ran in."""
    from ctc_drafter.decoding import CTCDrafter

    beta = {}
    for budget in a.budgets:
        d = CTCDrafter.from_pretrained(a.base_model, draft, dtype=a.dtype, proposer="ctc", generator="prefix",
                                       budget=budget, adaptive=False)  # the draft's acceptance: every step speculates
        tokens = steps = 0
        for p in prompts:
            r = d.chat(p, max_new_tokens=a.max_new_tokens)
            tokens, steps = tokens + r.new_tokens, steps + r.steps
        beta[str(budget)] = round(tokens / steps, 4)
        print(f"{draft}: budget {budget} beta {tokens / steps:.3f}", flush=True)
    return beta, str(d.base.dtype).removeprefix("torch.")


def measure_reference(a, prompts: list[str]) -> dict:
    """The same measurement for an existing draft (--reference, e.g. the shipped `default`)."""
    path = Path(a.out) / "beta" / "reference.json"
    if path.is_file() and json.loads(path.read_text()).get("draft") == a.reference:
        return json.loads(path.read_text())
    beta, dtype = held_out_beta(a, a.reference, prompts)
    row = {"draft": a.reference, "beta": beta, "dtype": dtype}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=1))
    return row


def measure_one(a, loss: str, size: int, prompts: list[str]) -> dict:
    path = Path(a.out) / "beta" / f"{loss}-{size}.json"
    if path.is_file():
        return json.loads(path.read_text())
    row = {"loss": loss, "size": size, "prompts": len(prompts), "max_new_tokens": a.max_new_tokens}
    row["beta"], row["dtype"] = held_out_beta(a, str(ckpt_dir(a, loss, size)), prompts)
    ckpt = ckpt_dir(a, loss, size)
    args = json.loads((ckpt / "train_args.json").read_text()) if (ckpt / "train_args.json").is_file() else {}
    row["positions"] = sum(d.get("positions", 0) for d in args.get("data_summary", []))  # all, held-out share incl.
    log = [json.loads(x) for x in (ckpt / "log.jsonl").read_text().splitlines() if x.strip()] \
        if (ckpt / "log.jsonl").is_file() else []
    row["last_log"] = log[-1] if log else None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=1))
    return row


def report(a, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ctc_drafter.models.cpu_info import cpu_identity

    lines = [f"Held-out beta (accepted tokens per base pass, the draft alone, `prefix` policy) on the last "
             f"{a.prompts} arena prompts, greedy, {a.max_new_tokens} new tokens; CPU: {cpu_identity()['cpu']}; "
             f"{time.strftime('%Y-%m-%d')}.", "",
             "| variant | subset size | positions in the subset | " + " | ".join(f"beta @ {b} nodes" for b in a.budgets) + " |",
             "|---|---|---|" + "---|" * len(a.budgets)]
    for r in sorted(rows, key=lambda r: (r["loss"], r["size"])):
        lines.append(f"| {r['loss']} | {r['size']} | {r.get('positions', '-')} | " + " | ".join(f"{r['beta'][str(b)]:.3f}" for b in a.budgets) + " |")
    if a.reference_row:
        lines.append(f"| reference: {a.reference} | | | " + " | ".join(f"{a.reference_row['beta'][str(b)]:.3f}" for b in a.budgets) + " |")
    lines += ["", "Command:", "", "```", " ".join(["python scripts/learning_curve.py", *sys.argv[1:]]), "```", ""]
    Path(a.out, "curve.md").write_text("\n".join(lines))
    if len({r["size"] for r in rows}) == 1:  # one size: a capacity comparison, so bars per variant
        capacity_plot(a, rows, plt)
        print("\n".join(lines), flush=True)
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for loss in a.losses:
        mine = sorted((r for r in rows if r["loss"] == loss), key=lambda r: r["size"])
        for b, style in zip(a.budgets, ["-", "--", ":", "-."]):
            if mine:
                ax.plot([r["positions"] for r in mine], [r["beta"][str(b)] for r in mine], style, marker="o",
                        label=f"{loss}, {b} nodes")
    ax.set_xscale("log")
    ax.set_xlabel("trainable positions in the data (5 % held out by train)")
    ax.set_ylabel("held-out beta (tokens per base pass)")
    ax.set_title("draft learning curve")
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(a.out, "curve.png"), dpi=110)
    print("\n".join(lines), flush=True)


def capacity_plot(a, rows: list[dict], plt) -> None:
    """Variants trained on the same data (one size): grouped bars of held-out beta per node budget."""
    rows = sorted(rows, key=lambda r: a.losses.index(r["loss"]) if r["loss"] in a.losses else len(a.losses))
    names = [r["loss"] for r in rows] + ([f"shipped ({a.reference})"] if a.reference_row else [])
    betas = [r["beta"] for r in rows] + ([a.reference_row["beta"]] if a.reference_row else [])
    width = 0.8 / len(a.budgets)
    fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(names)), 4.5))
    for i, b in enumerate(a.budgets):
        ax.bar([x + (i - (len(a.budgets) - 1) / 2) * width for x in range(len(names))],
               [beta[str(b)] for beta in betas], width, label=f"{b} nodes")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylim(1.0, None)
    ax.set_ylabel("held-out beta (tokens per base pass)")
    ax.set_title(f"draft variants at {rows[0]['size']} trained positions")
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(a.out, "curve.png"), dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--base-model", default="default")
    ap.add_argument("--sizes", default="16000,32000,64000,128000,256000")
    ap.add_argument("--variants", "--losses", dest="losses", default="ctc,ce", help=f"comma-separated: {', '.join(VARIANTS)}")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--budgets", default="4,16,64")
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--questions", default=str(ARENA))
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--variant", action="append", default=[], metavar='NAME="TRAIN OPTIONS"',
                    help="define a variant (then list it in --variants)")
    ap.add_argument("--steps", default="subset,train,measure,report")
    ap.add_argument("--reference", default=None, help="an existing draft measured the same way (e.g. default)")
    ap.add_argument("train_args", nargs="*", help="more `ctc-drafter train` options, after --")
    a = ap.parse_args()
    a.sizes = [int(x) for x in a.sizes.split(",")]
    a.budgets = [int(x) for x in a.budgets.split(",")]
    a.losses = a.losses.split(",")
    for spec in a.variant:
        name, sep, opts = spec.partition("=")
        if not sep or not name:
            ap.error(f'--variant: expected NAME="train options", got {spec!r}')
        VARIANTS[name] = shlex.split(opts)
    if set(a.losses) - set(VARIANTS):
        ap.error(f"--variants: unknown {sorted(set(a.losses) - set(VARIANTS))}; choose from {', '.join(VARIANTS)}")
    steps = set(a.steps.split(","))
    subsets = make_subsets(a)
    rows = []
    for size, folders in subsets.items():
        for loss in a.losses:
            if "train" in steps:
                train_one(a, loss, size, folders)
            if "measure" in steps and trained(a, loss, size):
                rows.append(measure_one(a, loss, size, held_out_prompts(a)))
    a.reference_row = measure_reference(a, held_out_prompts(a)) if a.reference and "measure" in steps else None
    if "report" in steps and rows:
        report(a, rows)


if __name__ == "__main__":
    main()
