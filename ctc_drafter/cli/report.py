"""`ctc-drafter report`: speedup (gamma), tokens per step (beta), agreement and accuracy of two answer files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import CTCDrafterError


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="compare a speculative answer file with a baseline one",
                       description="Speedup (gamma, gamma_mean), tokens per verification step (beta), token-exact "
                                   "agreement and GSM8K accuracy of a speculative answer file against a baseline.")
    p.add_argument("spec", metavar="SPEC.jsonl", help="answer file of the speculative run")
    p.add_argument("--baseline", required=True, metavar="BASE.jsonl", help="answer file of the baseline run")
    p.add_argument("--plot", metavar="OUT.png", help="write a PNG: speedup and beta per category, accepted lengths")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--margins", action="store_true",
                   help="for each diverging answer, run the base (--base-model, default: the embedded one) on the "
                        "shared prefix and report its top-2 logit margin there (needs --question-file)")
    p.add_argument("--question-file", help="question file, for categories the answer files do not record")
    p.add_argument("--gsm8k-file", help="GSM8K file with reference answers ('#### N'), for accuracy")
    p.add_argument("--tokenizer", help="tokenizer folder (or 'default') to count tokens of answers that record none")
    p.add_argument("--base-model", help="same as --tokenizer: the base model whose tokenizer counts tokens")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a --tokenizer / --base-model folder that ships its own Python code to run it")
    p.set_defaults(func=run)


def tokenizer_loader(name: str | None, trust_remote_code: bool = False):
    """A function loading the tokenizer on first use (most reports never need one), or None."""
    if not name:
        return None

    def load():
        from transformers import AutoTokenizer

        from ..models.base import locate_model, quiet_transformers

        quiet_transformers()
        path, gguf, _ = locate_model(name, "tokenizer")
        try:
            return AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}),
                                                 trust_remote_code=trust_remote_code)
        except Exception as e:  # noqa: BLE001 - any loader failure is a bad path for the user
            raise CTCDrafterError(f"cannot load a tokenizer from {name}: {str(e).strip().splitlines()[0]}") from e

    return load


def run(args) -> int:
    from ..evaluation.report import build_report
    from ..evaluation.report_render import format_report, plot_format, plot_report

    if args.tokenizer and args.base_model and args.tokenizer != args.base_model:
        raise CTCDrafterError("give --tokenizer or --base-model, not both")
    for path, flag in ((args.question_file, "--question-file"), (args.gsm8k_file, "--gsm8k-file")):
        if path and not Path(path).is_file():
            raise CTCDrafterError(f"{flag} {path} not found")
    if args.plot:
        plot_format(args.plot)  # a file type matplotlib cannot write fails now, not after the report
        inputs = [args.spec, args.baseline, args.question_file, args.gsm8k_file]
        if any(p and Path(p).resolve() == Path(args.plot).resolve() for p in inputs):
            raise CTCDrafterError(f"--plot {args.plot} is one of report's input files; give another file name")
    tok = args.tokenizer or args.base_model
    r = build_report(args.spec, args.baseline, load_tokenizer=tokenizer_loader(tok, args.trust_remote_code),
                     question_file=args.question_file, gsm8k_file=args.gsm8k_file, tokenizer_name=tok or "")
    if args.margins:
        if not args.question_file:
            raise CTCDrafterError("--margins needs --question-file (to rebuild the prompts)")
        from ..evaluation.margins import divergence_margins
        from ..models.base import load_base_model

        base = load_base_model(args.base_model or args.tokenizer or "default") if r["divergences"] else None
        r["divergence_margins"] = divergence_margins(base, r, args.question_file) if base is not None else []
    if args.plot:
        plot_report(r, args.plot)
        r["plot"] = str(args.plot)
    if args.json:
        print(json.dumps(r, ensure_ascii=False))
    else:
        print(format_report(r))
        if args.plot:
            print(f"plot: {args.plot}")
    if r["gamma"] is None:
        print("ctc-drafter: warning: gamma could not be computed (see notes)", file=sys.stderr)
    for note in r["notes"]:
        if note.startswith("WARNING: "):
            print(f"ctc-drafter: warning: {note[len('WARNING: '):]}", file=sys.stderr)
    return 0
