"""`ctc-drafter distill`: chat data -> training shards labelled by the frozen base (input of `train`).

One process by default; `--workers N` (CPU) or `--gpus "0;1"` / `"0,1;2,3"` (a worker per GPU group)
start worker processes; under `accelerate launch` each launched process takes its share of shards.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import checks
from .common import add_model_args


def _mode(text: str) -> str:
    from ..data.distill import MODE_ALIASES, MODES

    mode = MODE_ALIASES.get(text, text)
    if mode not in MODES:
        raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {', '.join(MODES)})")
    return mode


def add_parser(sub) -> None:
    p = sub.add_parser(
        "distill", help="label chat data with the base model (self-distillation) for `train`",
        description="Have the base model answer the user turns of chat data (or keep the data's answers), then "
                    "record its greedy next token at every position into shards for `ctc-drafter train`. "
                    "Re-running with the same options resumes an interrupted run.")
    p.add_argument("--data", nargs="+", action="extend", required=True, metavar="FILE",
                   help="JSON or JSON Lines files (repeat the flag or list several): ShareGPT conversations, "
                        "{messages}, {turns} (MT-Bench, Arena), {question, answer} (GSM8K), {instruction, output} "
                        "or {prompt, response}; malformed records are counted and skipped")
    p.add_argument("--out", default=None,
                   help="folder for the shards and manifest.json (default: data/<base model name>)")
    add_model_args(p, draft=False)
    p.add_argument("--mode", "--responses", dest="mode", type=_mode, default="regenerate",
                   metavar="{regenerate,teacher-forced}",
                   help="regenerate (default): the base answers every user turn itself, greedy, seeing its own "
                        "earlier answers; teacher-forced: keep the dataset's answers (records without are skipped)")
    p.add_argument("--max-len", "--max-length", dest="max_len", type=checks.int_in(2), default=None,
                   help="tokens per conversation, longer ones are cut (default: 2048 or the base's limit)")
    p.add_argument("--max-new-tokens", type=checks.int_in(1), default=512, help="tokens per generated answer")
    p.add_argument("--temperature", type=checks.temperature, default=0.0, help="for generated answers; 0 = greedy")
    p.add_argument("--top-p", type=checks.finite_float(0.0, 1.0, low_open=True), default=1.0)
    p.add_argument("--seed", type=checks.int_in(0, checks.MAX_SEED), default=0,
                   help="sampling seed (with --temperature > 0)")
    p.add_argument("--limit", type=checks.int_in(1), default=None, help="use only the first N records")
    p.add_argument("--batch-size", type=checks.int_in(1, 1024), default=None,
                   help="prompts decoded together (sorted by length), and sequences per labelling pass of dataset "
                        "answers; changes the data only where float rounding flips a near-tie "
                        "(default: 64 on CUDA, 32 otherwise)")
    p.add_argument("--shard-size", type=checks.int_in(1, 1 << 20), default=64,
                   help="records per shard: shard i holds records [i*N, (i+1)*N) (default 64)")
    p.add_argument("--save-hidden", action="store_true",
                   help="also store the base's last hidden states (fp16): `train` then skips the base pass, "
                        "at d*2 bytes per token on disk")
    par = p.add_mutually_exclusive_group()
    par.add_argument("--gpus", default=None, metavar="GROUPS",
                     help="one worker process per GPU group: '0;1;2;3' (a GPU each) or '0,1;2,3' (a model "
                          "spread over two GPUs each)")
    par.add_argument("--workers", type=checks.int_in(1, 256), default=None, metavar="N",
                     help="N worker processes on --device (CPU machines; on GPUs use --gpus)")
    p.add_argument("--overwrite", action="store_true", help="discard what --out holds and start again")
    p.add_argument("--json", action="store_true", help="print the manifest's summary as JSON")
    p.set_defaults(func=run)


def _options(args, max_len: int, on_cuda: bool):
    from ..data.distill import DistillOptions

    return DistillOptions(
        mode=args.mode, template=args.template, max_len=args.max_len or min(2048, max_len),
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        limit=args.limit, shard_size=args.shard_size, save_hidden=args.save_hidden,
        batch_size=args.batch_size or (64 if on_cuda else 32))


def _check_parallel_args(args) -> list[list[int]] | None:
    """GPU groups of --gpus (checked against this machine), or None; clear errors for bad combinations."""
    from ..data import distill as D
    from ..errors import CTCDrafterError

    if D.launched_distributed() and (args.gpus or args.workers):
        raise CTCDrafterError("--gpus / --workers start their own processes; under accelerate launch leave them out")
    if args.gpus is None:
        return None
    groups = D.parse_gpu_groups(args.gpus)
    if args.device not in ("auto", "cuda"):
        raise CTCDrafterError(f"--gpus runs on CUDA GPUs; it cannot be combined with --device {args.device}")
    D.check_gpu_groups(groups, args.gpus)
    return groups


def run(args) -> int:
    from ..data import distill as D
    from ..models.base import load_base_model, resolve_device

    # Everything the user can get wrong is checked before the (slow) model load: the options, the
    # data, and whether --out can take this run (the base's identity comes from its config alone).
    groups = _check_parallel_args(args)
    plan = D.read_plan(args.data, D.DistillOptions(mode=args.mode, limit=args.limit, shard_size=args.shard_size))
    spec = D.BaseSpec(args.base_model, "cuda" if groups else args.device, args.dtype)
    device = resolve_device(spec.device)
    signature, dtype, max_len = D.describe_base(spec, device)
    opts = _options(args, max_len, device.type == "cuda")
    opts.validate()
    out = Path(args.out) if args.out else Path("data") / signature["base_model"]
    was_complete = D.prepare_out_dir(out, D.new_manifest(signature, dtype, plan, opts), args.overwrite,
                                     write=False)["complete"]
    common = {"overwrite": args.overwrite, "progress": not args.json, "plan": plan}
    if groups or (args.workers or 1) > 1:
        m = D.distill_with_workers(spec, args.data, out, opts, gpu_groups=groups, workers=args.workers or 1, **common)
    elif D.launched_distributed():
        state = D.distributed_state(cpu=device.type == "cpu")
        base = load_base_model(args.base_model, device=state.device if args.device == "auto" else args.device,
                               dtype=args.dtype, trust_remote_code=args.trust_remote_code)
        m = D.distill_data_parallel(state, base, args.data, out, opts, **common)
        if m is None:  # not the main process: the main one reports
            return 0
    else:
        base = load_base_model(args.base_model, device=args.device, dtype=args.dtype,
                               trust_remote_code=args.trust_remote_code)
        m = D.distill(base, args.data, out, opts, **common)
    _print_summary(m, out, was_complete, args.json)
    return 0


def _print_summary(m: dict, out: Path, was_complete: bool, as_json: bool) -> None:
    st = m["stats"]
    if as_json:
        print(json.dumps({"out": str(out), "shards": len(m["shards"]), "complete": m["complete"],
                          "malformed_examples": m["malformed"]["examples"], **st}))
        return
    if was_complete:
        print(f"{out} is already complete (use --overwrite to distil again)", file=sys.stderr)
    agree = f"{100 * st['agreement']:.1f}%" if st["agreement"] is not None else "n/a"
    skipped = ", ".join(f"{n} {r}" for r, n in st["skipped"].items()) or "none"
    print(f"{out}: {st['sequences']} sequences, {st['tokens']} tokens ({st['assistant_tokens']} assistant), "
          f"{len(m['shards'])} shards from {st['records']} records; skipped: {skipped}; malformed: {st['malformed']}")
    for reason in m["malformed"]["examples"]:
        print(f"  malformed: {reason}", file=sys.stderr)
    print(f"base {m['base']['base_model']} ({m['dtype']}); mode {m['mode']}"
          + (f", {st['replies_generated']} answers generated, {st['replies_unfinished']} cut at the token limit"
             if m["mode"] == "regenerate" else "")
          + f"; data tokens matching the base's greedy choice: {agree}")

