"""`ctc-drafter make-prompts`: the base model writes user prompts itself, into a question file for `distill`."""

from __future__ import annotations

import json

from . import checks
from .common import add_model_args


def add_parser(sub) -> None:
    p = sub.add_parser(
        "make-prompts", help="sample user prompts from the base model itself (no dataset needed) for `distill`",
        description="Render the chat template's user header and let the base write the user's turn (temperature "
                    "sampling, one seed per prompt), keep the finished, English, non-duplicate ones and append them "
                    "to a question file that `ctc-drafter distill --data` reads. Rerunning continues: seeds already "
                    "in the file (or in FILE.rejected.jsonl) are skipped; a larger --count extends the file.")
    p.add_argument("--out", required=True, metavar="FILE", help="question file (JSON Lines) to append to")
    add_model_args(p, draft=False)
    p.add_argument("--count", type=checks.int_in(1), default=1000, help="seeds to sample (default 1000)")
    p.add_argument("--seed-start", type=checks.int_in(0, checks.MAX_SEED), default=0,
                   help="first seed: seeds --seed-start .. --seed-start + --count - 1")
    p.add_argument("--temperature", type=checks.temperature, default=1.0, help="sampling temperature (> 0)")
    p.add_argument("--top-p", type=checks.finite_float(0.0, 1.0, low_open=True), default=0.95)
    p.add_argument("--max-new-tokens", type=checks.int_in(1), default=256,
                   help="a prompt the base has not finished within this is rejected")
    p.add_argument("--batch-size", type=checks.int_in(1), default=32, help="prompts sampled together")
    p.add_argument("--min-words", type=checks.int_in(1), default=3)
    p.add_argument("--max-words", type=checks.int_in(1), default=400)
    p.add_argument("--min-ascii", type=checks.finite_float(0.0, 1.0), default=0.9,
                   help="least share of a prompt's letters that are ASCII")
    p.add_argument("--min-english", type=checks.finite_float(0.0, 1.0), default=0.05,
                   help="least share of a prompt's words that are English function words (the, to, you, ...)")
    p.add_argument("--dedup-threshold", type=checks.finite_float(0.0, 1.0, low_open=True), default=0.7,
                   help="character 5-gram Jaccard similarity at which a prompt nearly duplicates a kept one")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from ..data.self_prompts import PromptOptions, make_prompts, read_progress
    from ..errors import CTCDrafterError
    from ..models.base import load_base_model

    if args.template != "auto":
        raise CTCDrafterError("make-prompts renders the tokenizer's own chat template; leave --template at auto")
    opts = PromptOptions(count=args.count, seed_start=args.seed_start, temperature=args.temperature, top_p=args.top_p,
                         max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, min_words=args.min_words,
                         max_words=args.max_words, min_ascii=args.min_ascii, min_english=args.min_english,
                         dedup_threshold=args.dedup_threshold)
    opts.validate()  # before the (slow) model load, as is the --out file's format (only read)
    read_progress(Path(args.out))
    base = load_base_model(args.base_model, device=args.device, dtype=args.dtype)
    summary = make_prompts(base, Path(args.out), opts, progress=not args.json)
    if args.json:
        print(json.dumps(summary))
    else:
        reasons = ", ".join(f"{n} {r}" for r, n in summary["reasons"].items()) or "none"
        print(f"{summary['out']}: {summary['kept']} prompts kept, {summary['rejected']} rejected ({reasons})")
    return 0
