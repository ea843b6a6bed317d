"""`ctc-drafter eval`: answer MT-bench or GSM8K questions, timing each turn, into a FastChat answer file.

Run once with speculation and once with --baseline (another --model-id), then `ctc-drafter report`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import CTCDrafterError
from .common import add_decoding_args, add_model_args


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="answer benchmark questions (MT-bench, GSM8K) and record speed",
                       description="Answer benchmark questions and record speed per turn, resumably, in "
                                   "FastChat's answer-file schema ({answer_dir}/{model_id}.jsonl).")
    p.add_argument("--bench", required=True, choices=["mt_bench", "gsm8k"])
    p.add_argument("--question-file", required=True, help="MT-bench question.jsonl or GSM8K test.jsonl")
    p.add_argument("--model-id", required=True, help="names the run and its answer file")
    p.add_argument("--baseline", action="store_true", help="vanilla decoding through the same code (no draft)")
    p.add_argument("--question-begin", type=int, default=None, help="first question index (0-based)")
    p.add_argument("--question-end", type=int, default=None, help="one past the last question index")
    p.add_argument("--answer-dir", default="data/model_answer", help="where {model_id}.jsonl goes")
    p.add_argument("--answer-file", default=None, help="answer file path (overrides --answer-dir)")
    p.add_argument("--num-choices", type=int, default=1, help="answers per question")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_args(p)
    add_decoding_args(p)
    p.set_defaults(func=run)


def _check_args(args) -> None:
    if args.max_new_tokens < 1:
        raise CTCDrafterError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.num_choices < 1:
        raise CTCDrafterError(f"--num-choices must be >= 1, got {args.num_choices}")
    if not args.model_id.strip() or "/" in args.model_id:
        raise CTCDrafterError(f"--model-id {args.model_id!r} must be a non-empty name without '/'")


def _meta(args, drafter) -> dict:
    from ..evaluation.eval import ANSWER_FORMAT

    spec = not args.baseline
    return {
        "format": ANSWER_FORMAT,
        "bench": args.bench,
        "speculative": spec,
        "generator": drafter.candidates.name if spec else None,
        "budget": drafter.candidates.budget if spec else None,
        "draft_model": args.draft_model if spec else None,
        "draft_trained": drafter.draft_trained if spec else None,
        "base_model": drafter.base.name,
        "device": str(drafter.base.device),
        "dtype": str(drafter.base.dtype).replace("torch.", ""),
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "max_new_tokens": args.max_new_tokens,
        "template": args.template,
        "seed": args.seed,
        "question_file": str(Path(args.question_file).resolve()),
    }


def run(args) -> int:
    from ..decoding import CTCDrafter
    from ..evaluation.eval import run_eval
    from ..evaluation.questions import load_questions

    _check_args(args)
    # Questions first: a bad file or range fails in a second, before minutes of model loading.
    questions = load_questions(args.question_file, args.bench, args.question_begin, args.question_end)
    answer_file = Path(args.answer_file) if args.answer_file else Path(args.answer_dir) / f"{args.model_id}.jsonl"
    drafter = CTCDrafter.from_pretrained(args.base_model, None if args.baseline else args.draft_model,
                                         device=args.device, dtype=args.dtype, generator=args.generator,
                                         budget=args.budget)
    gen_kwargs = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                  "top_k": args.top_k}
    s = run_eval(drafter, questions, answer_file, args.model_id, _meta(args, drafter), speculative=not args.baseline,
                 gen_kwargs=gen_kwargs, template=args.template, seed=args.seed, num_choices=args.num_choices,
                 progress=not args.no_progress)
    tps = s["new_tokens"] / s["wall_s"] if s["wall_s"] > 0 else 0.0
    beta = s["new_tokens"] / s["steps"] if s["steps"] else 0.0
    c = drafter.candidates
    mode = "baseline" if args.baseline else f"speculative ({c.name}, budget {c.budget})"
    print(f"[{mode}] answered {s['answered']} question(s), skipped {s['skipped']} already answered; "
          f"{s['new_tokens']} tokens in {s['wall_s']:.2f} s = {tps:.1f} tokens/s, {beta:.2f} tokens/step "
          f"-> {answer_file}", file=sys.stderr)
    return 0
