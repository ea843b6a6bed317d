"""The seed repository's command lines (github.com/ZhuofanWen/CTC-drafter), accepted as its README
writes them and run as our `distill`, `train` and `eval`.

`seed/` in the checkout holds a thin script at each path the seed's README runs (ge_data/allocation.py,
train/main.py, evaluation/{MT-bench,GSM8K}/scripts/*.py) and the draft configs of train/*.json; each
script calls one function here. Every function reads the seed's options with the seed's names and
defaults, prints the `ctc-drafter` command it runs, and runs it through `cli.main` (one-line errors,
exit 2). An option that means nothing here is accepted and its --help says so; one we cannot honour
is refused in one line, never mapped onto something else.
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import os
import re
import shlex
import sys
from pathlib import Path

from ..errors import CTCDrafterError, read_json_object

log = logging.getLogger(__name__)

SEED_RECORDS = 68000  # allocation.py's fixed range s..e: the records its data step labels
SEED_LAST_EPOCH = 20  # train/main.py: `for epoch in range(recover + 1, num_epochs + 1)`, num_epochs 20
SEED_TREES = ("medusa", "mc_sim_7b_63")  # the seed's model/choices.py defines `medusa`: Medusa's mc_sim_7b_63
SEED_TYPES = ("vicuna", "llama2chat")  # allocation.py --type, and the evaluation scripts' names


class _SeedParser(argparse.ArgumentParser):
    def error(self, message):  # the CLI's one-line form
        self.exit(2, f"ctc-drafter: error: {message} (see `{self.prog} --help`)\n")


def _run(argv: list[str]) -> int:
    """Say which command this is, then run it as `ctc-drafter` would."""
    from .main import main

    print("ctc-drafter: running: ctc-drafter " + shlex.join(argv), file=sys.stderr)
    return main(argv)


def _fail(message: str) -> int:
    print(f"ctc-drafter: error: {message}", file=sys.stderr)
    return 2


def _parse(parser: argparse.ArgumentParser, argv: list[str]):
    try:
        return parser.parse_args(argv), None
    except SystemExit as e:  # --help, or the one-line error above
        return None, e.code if isinstance(e.code, int) else 2


# --------------------------------------------------------------------------- data step

def gpu_groups(spec) -> str:
    """The seed's GPU map, `[[0],[1],[2],[3]]` (a worker per GPU) or `[[0,1],[2,3]]` (a model over two
    GPUs per worker), as a list or its text -> our --gpus form '0;1;2;3' / '0,1;2,3'."""
    groups = spec
    if isinstance(spec, str):
        try:
            groups = ast.literal_eval(spec.strip())
        except (ValueError, SyntaxError):
            groups = None
    ok = (isinstance(groups, (list, tuple)) and groups
          and all(isinstance(g, (list, tuple)) and g and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                             for i in g) for g in groups))
    if not ok:
        raise CTCDrafterError(f"gpus {spec!r}: write a list of GPU groups, e.g. [[0],[1],[2],[3]] or [[0,1],[2,3]]")
    return ";".join(",".join(str(i) for i in g) for g in groups)


def data_parser() -> argparse.ArgumentParser:
    p = _SeedParser(
        prog="python allocation.py",
        description="The seed's data step (ge_data/allocation.py), run as `ctc-drafter distill --mode teacher-forced "
                    "--save-hidden`: the base reads each conversation with the dataset's answers and its last hidden "
                    "states and greedy next tokens are stored. --outdir is then the data folder itself (the seed "
                    "wrote OUTDIR/<worker>/data_N.ckpt); pass it to train/main.py --tmpdir. The first "
                    f"{SEED_RECORDS} records are used in file order (the seed took {SEED_RECORDS} after a seeded "
                    "shuffle). Set the GPU map in allocation.py's `gpus = ...` line as the seed's README says, or "
                    "pass --gpus; GPU numbers are the machine's own, as the seed's (it overwrote "
                    "CUDA_VISIBLE_DEVICES with them per worker).")
    p.add_argument("--outdir", default="0", help="the data folder to write (the seed's default is '0')")
    p.add_argument("--type", default="vicuna", choices=SEED_TYPES, help="the base's chat format (--template)")
    p.add_argument("--basemodel", default="basemodel", help="the base model folder (--base-model)")
    p.add_argument("--data", default="ShareGPT_V4.3_unfiltered_cleaned_split.json",
                   help="ShareGPT JSON (any format `ctc-drafter distill --data` reads)")
    p.add_argument("--gpus", default=None, metavar="MAP",
                   help="ours, not the seed's: the GPU map, e.g. '[[0],[1],[2],[3]]' or '[[0,1],[2,3]]'; overrides "
                        "the `gpus = ...` line of allocation.py")
    return p


def data_step(argv: list[str], gpus=None) -> int:
    """allocation.py: `gpus` is its `gpus = ...` line (None: one process, on the first GPU or on the CPU)."""
    args, code = _parse(data_parser(), argv)
    if args is None:
        return code
    spec = args.gpus if args.gpus is not None else gpus
    ours = ["distill", "--base-model", args.basemodel, "--data", args.data, "--out", args.outdir,
            "--mode", "teacher-forced", "--save-hidden", "--template", args.type, "--limit", str(SEED_RECORDS)]
    if spec is not None:
        try:
            groups = gpu_groups(spec)
        except CTCDrafterError as e:
            return _fail(str(e))
        physical_gpu_numbers()
        import torch

        if not torch.cuda.is_available():
            return _fail(f"gpus = {spec} asks for CUDA GPUs, but this machine has none; set gpus = None in "
                         "allocation.py (one process on the CPU)")
        ours += ["--gpus", groups]
    return _run(ours)


def physical_gpu_numbers() -> None:
    """The seed's allocation.py set each worker's CUDA_VISIBLE_DEVICES to its group, so its numbers are
    the machine's; ours count the GPUs CUDA_VISIBLE_DEVICES shows. Dropping the variable first makes
    them the same. (Before CUDA starts: it reads the variable once.)"""
    shown = os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    if shown:
        print(f"ctc-drafter: note: GPU numbers are the machine's, as in the seed (CUDA_VISIBLE_DEVICES={shown} "
              "is replaced per worker)", file=sys.stderr)


# --------------------------------------------------------------------------- training

# The seed's draft config (train/*.json) is a Llama config of the one-layer draft; these are the
# fields a draft of ours takes from it. Its tokens ids, dtype, cache and context fields describe the
# base or the runtime and play no part; rope comes from the base, as in the seed's draft.
_CONFIG_FIELDS = {"hidden_size": "hidden_size", "vocab_size": "vocab_size", "num_hidden_layers": "num_context_layers",
                  "intermediate_size": "intermediate_size", "num_attention_heads": "num_attention_heads",
                  "num_key_value_heads": "num_key_value_heads", "rms_norm_eps": "rms_norm_eps",
                  "rope_theta": "rope_theta"}


def draft_config_from_llama(path: str | Path) -> dict:
    """A seed draft config (Llama config JSON) -> DraftConfig fields for `train --config`."""
    cfg = read_json_object(Path(path).expanduser(), "--configpath")
    if cfg.get("model_type", "llama") != "llama":
        raise CTCDrafterError(f"--configpath {path}: model_type {cfg['model_type']!r}; the seed's configs are Llama "
                              "configs (model_type llama)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise CTCDrafterError(f"--configpath {path}: hidden_act {cfg['hidden_act']!r}; the draft layer uses silu")
    missing = [k for k in ("hidden_size", "num_attention_heads") if k not in cfg]
    if missing:
        raise CTCDrafterError(f"--configpath {path} has no {', '.join(missing)}")
    over = {ours: cfg[theirs] for theirs, ours in _CONFIG_FIELDS.items() if cfg.get(theirs) is not None}
    heads = cfg["num_attention_heads"]
    if isinstance(heads, int) and heads > 0 and isinstance(cfg["hidden_size"], int):
        over["head_dim"] = cfg.get("head_dim") or cfg["hidden_size"] // heads
        over.setdefault("num_key_value_heads", heads)
    return over


def train_parser() -> argparse.ArgumentParser:
    p = _SeedParser(
        prog="accelerate launch --mixed_precision=bf16 train/main.py",
        description="The seed's training (train/main.py), run as `ctc-drafter train --preset reference` (the "
                    "reference recipe: the eagle1 layout, feature 1.0 + soft token CE 0.1 + CTC --cw over 6 positions "
                    "against --fixlen tokens, uniform input noise, AdamW at --lr with 2000 warmup steps then a line to "
                    "step 800000, clipping by value 0.5, every position trained, 5% held out, 1600 tokens per sequence) "
                    "and its epochs: numbered 0..20 (21 epochs), CPDIR/state_N after epoch N, so --recover N continues "
                    "with epoch N+1 as the seed's does. The seed saved no state at epochs 4, 9, 14, 19 (its "
                    "`if (epoch + 1) % save_freq` test); here every epoch is saved. CPDIR itself is then the latest "
                    "draft (CPDIR/epoch_N each epoch's), for the evaluation scripts' --draft-model-path.")
    p.add_argument("--basepath", default="vicuna-7b-v1.3", help="the base model folder (--base-model)")
    p.add_argument("--configpath", default="config.json",
                   help="the draft's Llama config (train/vicuna_7B_config.json and its siblings): its layer count, "
                        "sizes and heads shape the draft; hidden_size and vocab_size must be the base's")
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--bs", type=int, default=1)
    p.add_argument("--gradient-accumulation-steps", type=int, default=1,
                   help="only 1: `ctc-drafter train` does not accumulate gradients (a larger --bs does the same)")
    p.add_argument("--tmpdir", default="0", help="the data folder written by allocation.py --outdir (--data)")
    p.add_argument("--outdir", default="0", help="accepted, unused (as in the seed)")
    p.add_argument("--cpdir", default="0", help="the checkpoint folder (--out)")
    p.add_argument("--fixlen", type=int, default=3, help="target tokens of each CTC window (--label-len)")
    p.add_argument("--recover", type=int, default=-1, help="resume from CPDIR/state_N (-1: start afresh)")
    p.add_argument("--cw", type=float, default=0.01, help="CTC loss weight (--ctc-weight)")
    p.add_argument("--overwrite", action="store_true",
                   help="ours, not the seed's: start afresh over an earlier run in CPDIR (without it that is refused)")
    return p


def train_step(argv: list[str]) -> int:
    args, code = _parse(train_parser(), argv)
    if args is None:
        return code
    if args.gradient_accumulation_steps != 1:
        return _fail(f"--gradient-accumulation-steps {args.gradient_accumulation_steps}: ctc-drafter train does not "
                     "accumulate gradients; use --bs (sequences per step) instead")
    if args.recover < -1:
        return _fail(f"--recover takes a state number, or -1 to start afresh; got {args.recover}")
    try:
        config = draft_config_from_llama(args.configpath)
    except CTCDrafterError as e:
        return _fail(str(e))
    ours = ["train", "--base-model", args.basepath, "--data", args.tmpdir, "--out", args.cpdir,
            "--config", json.dumps(config), "--preset", "reference", "--label-len", str(args.fixlen),
            "--ctc-weight", repr(args.cw), "--lr", repr(args.lr), "--bs", str(args.bs),
            "--first-epoch", "0", "--epochs", str(SEED_LAST_EPOCH)]
    if args.recover != -1:
        ours += ["--recover", str(args.recover)]
    if args.overwrite:
        ours.append("--overwrite")
    return _run(ours)


# --------------------------------------------------------------------------- evaluation

def eval_parser(script: str) -> argparse.ArgumentParser:
    p = _SeedParser(
        prog=f"python scripts/{script}",
        description="The seed's evaluation script, run as `ctc-drafter eval` from this folder as the seed's: questions "
                    "from data/question.jsonl, answers appended to data/model_answer/MODEL_ID-temperature-T.jsonl "
                    "(FastChat's schema), then sorted by question id. Decoding is greedy whatever --temperature "
                    "says, as the seed's was (it only names the file); the draft proposes alone (--proposer ctc) "
                    "on every step (--always-speculate) over the 63-path Medusa tree.")
    p.add_argument("--draft-model-path", default="down_checkpoints/LC70B",
                   help="train/main.py's --cpdir (the latest draft) or one of its state_N folders (the draft of epoch N)")
    p.add_argument("--base-model-path", default="/home/lyh/weights/hf/llama2chat/70B/", help="the base model folder")
    p.add_argument("--load-in-8bit", action="store_false", help="accepted, unused (as in the seed)")
    p.add_argument("--model-id", default="ess-vicuna-70b-fp16")
    p.add_argument("--bench-name", default="mt_bench",
                   help="accepted, unused: as in the seed, the folder the script sits in picks the questions")
    p.add_argument("--question-begin", type=int, default=None)
    p.add_argument("--question-end", type=int, default=None)
    p.add_argument("--answer-file", default=None)
    p.add_argument("--max-new-token", type=int, default=1024,
                   help="tokens per answer, at most what the base's context leaves (the seed stopped near 2048)")
    p.add_argument("--num-choices", type=int, default=1)
    p.add_argument("--num-gpus-per-model", type=int, default=1, help="accepted; one process answers every question")
    p.add_argument("--num-gpus-total", type=int, default=1, help="accepted; one process answers every question")
    p.add_argument("--max-gpu-memory", default=None, help="accepted, unused (as in the seed)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="names the answer file only: decoding is greedy, as the seed's was")
    p.add_argument("--tree-choices", default="mc_sim_7b_63", choices=SEED_TREES,
                   help="the seed's static tree: Medusa's 63 paths (--generator medusa)")
    p.add_argument("--use-safetensor-weight", default=False,
                   help="accepted, unused: drafts here are always safetensors")
    return p


def rejoin_split_values(argv: list[str], options: set[str]) -> list[str]:
    """The seed's README ends a value with a backslash and no space (`--model-id  vc_7b\\` before a line
    `--tree-choices medusa`), so the shell hands over `vc_7b--tree-choices` and `medusa`. Split such a
    value back at the option name it swallowed."""
    out = []
    for a in argv:
        m = re.fullmatch(r"([^-].*?)(--[a-z][a-z0-9-]*)", a)
        if m and m.group(2) in options:
            log.warning("read %r as %r %r (a value ended with '\\' and no space before the next line)",
                        a, m.group(1), m.group(2))
            out += [m.group(1), m.group(2)]
        else:
            out.append(a)
    return out


def draft_folder(path: str) -> str:
    """--draft-model-path: a draft folder as is; a state_N folder of our training means the draft of
    epoch N (epoch_N beside it: state_N holds the optimiser's state, the seed's draft format)."""
    p = Path(path).expanduser()
    m = re.fullmatch(r"state_(\d+)", p.name)
    if m and not (p / "config.json").is_file() and (p.parent / f"epoch_{m.group(1)}" / "config.json").is_file():
        log.info("reading --draft-model-path %s as the draft of that epoch, %s", path, p.parent / f"epoch_{m.group(1)}")
        return str(p.parent / f"epoch_{m.group(1)}")
    return path


def eval_step(argv: list[str], bench: str, template: str, baseline: bool) -> int:
    """One evaluation script of the seed: `bench` and `template` are the script's folder and name,
    `baseline` whether it is the *_baseline.py one."""
    from ..evaluation.answer_files import reorganize_answer_file

    script = f"{template}{'_baseline' if baseline else ''}.py"
    parser = eval_parser(script)
    argv = rejoin_split_values(argv, {o for a in parser._actions for o in a.option_strings})
    args, code = _parse(parser, argv)
    if args is None:
        return code
    if args.num_gpus_total // max(1, args.num_gpus_per_model) > 1:
        log.warning("--num-gpus-total %d: the seed split the questions over Ray workers; one process answers them "
                    "all here", args.num_gpus_total)
    model_id = f"{args.model_id}-temperature-{args.temperature}"
    answer_file = args.answer_file or f"data/model_answer/{model_id}.jsonl"
    question_file = Path("data/question.jsonl")
    if not question_file.is_file():
        where = ("MT-bench's question.jsonl (FastChat: fastchat/llm_judge/data/mt_bench/question.jsonl)"
                 if bench == "mt_bench" else "GSM8K's test.jsonl (github.com/openai/grade-school-math)")
        return _fail(f"{Path.cwd() / question_file} not found: run the script from its benchmark folder "
                     f"(seed/evaluation/...), or put {where} there")
    try:
        max_new = _cap_to_context(args.max_new_token, args.base_model_path)
    except CTCDrafterError as e:
        return _fail(str(e))
    ours = ["eval", "--bench", bench, "--question-file", str(question_file), "--model-id", model_id,
            "--answer-file", answer_file, "--base-model", args.base_model_path, "--template", template,
            "--max-new-tokens", str(max_new), "--num-choices", str(args.num_choices), "--temperature", "0"]
    if baseline:
        ours.append("--baseline")
    else:
        ours += ["--draft-model", draft_folder(args.draft_model_path), "--proposer", "ctc", "--generator", "medusa",
                 "--always-speculate"]
    for flag, value in (("--question-begin", args.question_begin), ("--question-end", args.question_end)):
        if value is not None:
            ours += [flag, str(value)]
    code = _run(ours)
    if code == 0 and Path(answer_file).is_file():  # the seed's reorg_answer_file
        reorganize_answer_file(answer_file)
    return code


def _cap_to_context(max_new: int, base: str) -> int:
    """--max-new-token within the base's context: the seed's loop stopped at the context's end (1960 of
    Vicuna's 2048 tokens) rather than refusing a large value."""
    import torch

    from ..data.worker_pool import BaseSpec, describe_base

    if max_new < 1:
        raise CTCDrafterError(f"--max-new-token must be at least 1, got {max_new}")
    _, _, context = describe_base(BaseSpec(base, "cpu", "auto"), torch.device("cpu"))
    return min(max_new, context)


def script_main(step, *args) -> None:
    """A seed script's body: run `step` on the command line, exit with its code."""
    from .main import install_log_handler

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    install_log_handler()
    try:
        code = step(sys.argv[1:], *args)
    except CTCDrafterError as e:
        code = _fail(str(e))
    sys.exit(code)
