"""`ctc-drafter eval`: answer MT-bench or GSM8K questions, timing each turn, into a FastChat answer file.

Run once with speculation and once with --baseline (another --model-id), then `ctc-drafter report`.
`--engine hf` / `hf-prompt-lookup` answer through Hugging Face `generate` instead (plain greedy, or
HF's prompt-lookup speculative decoding), `--engine llamacpp` through llama.cpp's own greedy on the base's
GGUF (needs llama-cpp-python), timed and recorded the same way: the table's reference points.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import CTCDrafterError
from ..evaluation.answer_files import answer_meta
from ..evaluation.hf_engine import DEFAULT_PROMPT_LOOKUP_TOKENS, ENGINES
from ..evaluation.llamacpp_engine import LLAMACPP
from .checks import MAX_BUDGET, check_max_new_tokens
from .common import add_decoding_args, add_model_args


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="answer benchmark questions (MT-bench, GSM8K) and record speed",
                       description="Answer benchmark questions and record speed per turn, resumably, in "
                                   "FastChat's answer-file schema and layout "
                                   "(data/{bench}/model_answer/{model_id}.jsonl).")
    p.add_argument("--bench", required=True, choices=["mt_bench", "gsm8k"])
    p.add_argument("--question-file", required=True, help="MT-bench question.jsonl or GSM8K test.jsonl")
    p.add_argument("--model-id", required=True, help="names the run and its answer file")
    p.add_argument("--baseline", action="store_true", help="vanilla decoding through the same code (no draft)")
    p.add_argument("--engine", default="ours", choices=ENGINES + (LLAMACPP,),
                   help="ours (CTC speculation, or vanilla with --baseline); hf: HF generate; hf-prompt-lookup: "
                        "HF generate with prompt lookup decoding; llamacpp: llama.cpp's greedy on the base's GGUF "
                        "(--base-model default or a .gguf; --threads, default torch's count) "
                        "(--draft-model, --tree-choices, --budget unused)")
    p.add_argument("--prompt-lookup-tokens", type=int, default=None, metavar="K",
                   help=f"candidate tokens per step for --engine hf-prompt-lookup "
                        f"(default {DEFAULT_PROMPT_LOOKUP_TOKENS})")
    p.add_argument("--question-begin", type=int, default=None, help="first question index (0-based)")
    p.add_argument("--question-stride", type=int, default=1,
                   help="take every N-th question of the range (10 on MT-bench: one per category)")
    p.add_argument("--question-end", type=int, default=None, help="one past the last question index")
    p.add_argument("--answer-dir", default=None,
                   help="where {model_id}.jsonl goes (default: data/{bench}/model_answer, FastChat's layout, where "
                        "its judge looks)")
    p.add_argument("--answer-file", default=None, help="answer file path (overrides --answer-dir)")
    p.add_argument("--num-choices", type=int, default=1, help="answers per question")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_args(p)
    add_decoding_args(p)
    p.set_defaults(func=run)


def _check_args(args) -> None:
    if args.num_choices < 1:
        raise CTCDrafterError(f"--num-choices must be >= 1, got {args.num_choices}")
    if not args.model_id.strip() or "/" in args.model_id:
        raise CTCDrafterError(f"--model-id {args.model_id!r} must be a non-empty name without '/'")
    if args.baseline and args.engine != "ours":
        raise CTCDrafterError(f"--baseline is our own vanilla loop; it does not combine with --engine {args.engine} "
                              "(--engine hf is HF's vanilla loop)")
    if args.backend != "torch" and args.engine != "ours":
        raise CTCDrafterError(f"--backend {args.backend} runs our loop; --engine {args.engine} answers through its own")
    if args.prompt_lookup_tokens is not None:
        if args.engine != "hf-prompt-lookup":
            raise CTCDrafterError("--prompt-lookup-tokens applies only to --engine hf-prompt-lookup")
        if not 1 <= args.prompt_lookup_tokens <= MAX_BUDGET:
            raise CTCDrafterError(f"--prompt-lookup-tokens must be between 1 and {MAX_BUDGET}, "
                                  f"got {args.prompt_lookup_tokens}")


def _meta(args, engine) -> dict:
    return answer_meta(engine, args.bench, args.question_file, engine_kind=args.engine,
                       speculative=not args.baseline,
                       draft_model=args.draft_model, temperature=args.temperature, top_p=args.top_p,
                       top_k=args.top_k, max_new_tokens=args.max_new_tokens, template=args.template, seed=args.seed)


def _load_engine(args):
    """Our SpeculativeDecoder (draft loaded only when speculating), or HF generate on the same base (no draft)."""
    if args.engine == "ours":
        from .common import load_drafter

        return load_drafter(args, None if args.baseline else args.draft_model)[0]
    from ..evaluation.hf_engine import HFEngine
    from ..models.base import load_base_model

    if args.engine == LLAMACPP:
        return _llamacpp_engine(args)
    base = load_base_model(args.base_model, device=args.device, dtype=args.dtype,
                           trust_remote_code=args.trust_remote_code)
    k = None if args.engine == "hf" else (args.prompt_lookup_tokens or DEFAULT_PROMPT_LOOKUP_TOKENS)
    return HFEngine(base, prompt_lookup_tokens=k)


def _llamacpp_engine(args):
    """llama.cpp on the base's GGUF; the HF base gives the tokenizer and EOS set (the same prompt ids)."""
    import torch

    from ..evaluation.llamacpp_engine import LlamaCppEngine, gguf_for, llama_cpp_missing
    from ..models.base import load_base_model

    reason = llama_cpp_missing()
    if reason:
        raise CTCDrafterError(f"--engine {LLAMACPP}: {reason}")
    gguf = gguf_for(args.base_model)
    base = load_base_model(args.base_model, device="cpu", dtype="float32", trust_remote_code=args.trust_remote_code)
    threads = args.threads if isinstance(args.threads, int) else torch.get_num_threads()
    return LlamaCppEngine(base, gguf, threads=threads)


def _mode(args, engine) -> str:
    if args.engine == "hf":
        return "HF generate"
    if args.engine == "hf-prompt-lookup":
        return f"HF prompt lookup (K={engine.prompt_lookup_tokens})"
    if args.engine == LLAMACPP:
        return engine.label()
    return "baseline" if args.baseline else engine.label()


def _ran_with(args, engine) -> str:
    """dtype, device, the CPU linear kernels and torch threads: what the timings depend on."""
    import torch

    if args.engine == LLAMACPP:
        return f"{engine.weights} GGUF, cpu, llama.cpp, {engine.threads} threads"
    kernels = engine.kernels if args.engine == "ours" else "stock"  # HF engines run the stock layers
    dev = engine.base.device
    where = f"{dev}, kernels {kernels}, {torch.get_num_threads()} threads" if dev.type == "cpu" else str(dev)
    return f"{str(engine.base.dtype).replace('torch.', '')}, {where}"


def run(args) -> int:
    from ..evaluation.eval import run_eval
    from ..evaluation.questions import load_questions

    _check_args(args)
    # Questions first: a bad file or range fails in a second, before minutes of model loading.
    questions = load_questions(args.question_file, args.bench, args.question_begin, args.question_end,
                               args.question_stride)
    answer_dir = Path(args.answer_dir) if args.answer_dir else Path("data") / args.bench / "model_answer"
    answer_file = Path(args.answer_file) if args.answer_file else answer_dir / f"{args.model_id}.jsonl"
    engine = _load_engine(args)
    check_max_new_tokens(args.max_new_tokens, engine.base)
    gen_kwargs = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                  "top_k": args.top_k}
    speculative = args.engine == "ours" and not args.baseline
    s = run_eval(engine, questions, answer_file, args.model_id, _meta(args, engine), speculative=speculative,
                 gen_kwargs=gen_kwargs, template=args.template, seed=args.seed, num_choices=args.num_choices,
                 progress=not args.no_progress)
    tps = s["new_tokens"] / s["wall_s"] if s["wall_s"] > 0 else 0.0
    beta = s["new_tokens"] / s["steps"] if s["steps"] else 0.0
    print(f"[{_mode(args, engine)}] answered {s['answered']} question(s), skipped {s['skipped']} already answered; "
          f"{s['new_tokens']} tokens in {s['wall_s']:.2f} s = {tps:.1f} tokens/s, {beta:.2f} tokens/step "
          f"({_ran_with(args, engine)}) -> {answer_file}", file=sys.stderr)
    return 0
