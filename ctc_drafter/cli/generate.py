"""`ctc-drafter generate`: answer one prompt, with speculation or (--baseline) without."""

from __future__ import annotations

import json
import sys

from .checks import check_max_new_tokens
from .common import add_decoding_args, add_model_args, load_drafter


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="answer one prompt")
    add_model_args(p)
    add_decoding_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--baseline", action="store_true", help="vanilla decoding, no speculation")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    p.set_defaults(func=run, cpu_kernels="auto")


def run(args) -> int:
    if not args.prompt.strip():
        from ..errors import CTCDrafterError

        raise CTCDrafterError("empty prompt")
    drafter, kernels = load_drafter(args, None if args.baseline else args.draft_model)
    check_max_new_tokens(args.max_new_tokens, drafter.base)
    streamer = None
    if not args.json:
        from transformers import TextStreamer

        streamer = TextStreamer(drafter.base.tokenizer, skip_prompt=True, skip_special_tokens=True)
    res = drafter.chat(args.prompt, template=args.template, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                       speculative=not args.baseline, streamer=streamer)
    if args.json:
        d = res.to_dict()
        d.pop("tokens")
        d["speculative"] = not args.baseline
        d["draft_trained"] = drafter.draft_trained if not args.baseline else None
        d["cpu_kernels"] = kernels.to_dict()  # the plan, its timings, cache hit or not
        d.update({k: None for k in drafter.settings()} if args.baseline else drafter.settings())
        print(json.dumps(d))
    else:
        mode = "baseline" if args.baseline else drafter.label()
        print(f"\n[{mode}] {res.new_tokens} tokens in {res.wall_s:.2f} s = {res.tokens_per_s:.1f} tokens/s, "
              f"{res.steps} steps, {res.mean_accept_length:.2f} tokens/step"
              + (f" ({res.arms_label()})" if res.arms_label() else ""),
              file=sys.stderr)
    return 0
