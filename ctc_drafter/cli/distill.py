"""`ctc-drafter distill`: chat data -> training shards labelled by the frozen base (input of `train`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import add_model_args


def add_parser(sub) -> None:
    p = sub.add_parser(
        "distill", help="label chat data with the base model (self-distillation) for `train`",
        description="Have the base model answer the user turns of chat data (or keep the data's replies), then "
                    "record its greedy next token at every position into shards for `ctc-drafter train`. "
                    "Re-running with the same options resumes an interrupted run.")
    p.add_argument("--data", nargs="+", required=True, metavar="FILE",
                   help="JSON or JSON Lines files: ShareGPT conversations, {messages}, {turns} (MT-Bench), "
                        "{question, answer} (GSM8K), {instruction, output} or {prompt, response}")
    p.add_argument("--out", default=None,
                   help="folder for the shards and manifest.json (default: data/<base model name>)")
    add_model_args(p, draft=False)
    p.add_argument("--responses", choices=["base", "data"], default="base",
                   help="base: the base model answers every user turn (default, what the draft must predict); "
                        "data: keep the data's own replies")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per conversation, longer ones are cut (default: 2048 or the base's limit)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="tokens per generated reply")
    p.add_argument("--temperature", type=float, default=0.0, help="for generated replies; 0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (with --temperature > 0)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N conversations")
    p.add_argument("--batch-size", type=int, default=None,
                   help="sequences per base pass (default: 32 on CUDA, 4 otherwise)")
    p.add_argument("--shard-tokens", type=int, default=1 << 18, help="tokens per shard file (about)")
    p.add_argument("--group-size", type=int, default=256,
                   help="conversations processed together; a resumed run restarts at a group boundary")
    p.add_argument("--save-hidden", action="store_true",
                   help="also store the base's last hidden states (fp16): `train` then skips the base pass, "
                        "at d*2 bytes per token on disk")
    p.add_argument("--overwrite", action="store_true", help="discard what --out holds and start again")
    p.add_argument("--json", action="store_true", help="print the manifest's summary as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data.distill import DistillOptions, distill
    from ..errors import CTCDrafterError
    from ..models.base import load_base_model

    for path in args.data:  # before the (slow) model load
        if not Path(path).is_file():
            raise CTCDrafterError(f"data file not found: {path}")
    base = load_base_model(args.base_model, device=args.device, dtype=args.dtype)
    batch = args.batch_size or (32 if base.device.type == "cuda" else 4)
    opts = DistillOptions(
        responses=args.responses, template=args.template,
        max_length=args.max_length or min(2048, base.max_length), max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed, limit=args.limit,
        shard_tokens=args.shard_tokens, group_size=args.group_size, save_hidden=args.save_hidden, batch_size=batch)
    out = Path(args.out) if args.out else Path("data") / base.name
    was_complete = (out / "manifest.json").is_file() and not args.overwrite and _complete(out)
    m = distill(base, args.data, out, opts, overwrite=args.overwrite, progress=not args.json)
    st = m["stats"]
    if args.json:
        print(json.dumps({"out": str(out), "shards": len(m["shards"]), "complete": m["complete"], **st}))
        return 0
    if was_complete:
        print(f"{out} is already complete (use --overwrite to distil again)", file=sys.stderr)
    agree = f"{100 * st['agreement']:.1f}%" if st["agreement"] is not None else "n/a"
    skipped = ", ".join(f"{n} {r}" for r, n in st["skipped"].items()) or "none"
    print(f"{out}: {st['sequences']} sequences, {st['tokens']} tokens ({st['train_tokens']} train), "
          f"{len(m['shards'])} shards from {st['conversations']} conversations; skipped: {skipped}")
    print(f"base {m['base']['base_model']} ({m['dtype']}); replies {m['options']['responses']}"
          + (f", {st['replies_generated']} generated, {st['replies_unfinished']} cut at the token limit"
             if m["options"]["responses"] == "base" else "")
          + f"; data tokens matching the base's greedy choice: {agree}")
    return 0


def _complete(out: Path) -> bool:
    try:
        return bool(json.loads((out / "manifest.json").read_text()).get("complete"))
    except (OSError, ValueError):
        return False
