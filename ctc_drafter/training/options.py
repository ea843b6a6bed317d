"""`train`'s options: TrainOptions (each option once: its default, type and help; the command line is
made from it), their checks (before the base loads), the draft config they make (--config with
--frames/--label-len/--loss/--arch on top) and the precision."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from .. import validate
from ..data.shards import check_shard_plan, plan_shards, read_manifest
from ..draft.config import ARCHITECTURES, LAYOUTS
from ..errors import CTCDrafterError, read_json_object
from ..models.base import resolve_device
from ..models.cpu_info import CPU, host_cpu
from .losses import AR_LOSS_WEIGHTS, LOSSES, default_loss_weights

MAX_BATCH = 4096  # sequences per step: an epoch's batch plan is bs x steps indices
SAMPLED_POSITIONS = 32  # --positions of a draft that cannot train every position in one pass (NAR)
MAX_POSITIONS = 1 << 16


def _opt(default, *flags, **argparse_kw):
    """A TrainOptions field: its default, and how `ctc-drafter train` takes it (flags beyond --name,
    argparse's type, help, ...)."""
    meta = {"flags": flags, "argparse": argparse_kw}
    if isinstance(default, list):
        return field(default_factory=list, metadata=meta)
    return field(default=default, metadata=meta)


def _ar_weight(part: str):
    extra = "; 0 trains an EAGLE-style head without a blank" if part == "ctc" else ""
    return _opt(None, type=validate.finite_float(0.0),
                help=f"with --arch ar: weight of the {part} loss (default {AR_LOSS_WEIGHTS[part]}{extra})")


def _positions_arg(text: str) -> int | str:
    """argparse type of --positions: 'all' or a count."""
    import argparse

    if text.strip().lower() == "all":
        return "all"
    try:
        int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither 'all' nor a count") from None
    return validate.int_in(1, MAX_POSITIONS)(text)


@dataclass
class TrainOptions:
    """Every option of a training run, defined once: `ctc-drafter train` makes its arguments from these
    fields, the Python API passes a TrainOptions to run_training, and train_args.json saves one.
    check_options applies the same rules to both."""

    preset: str | None = _opt(None, choices=["reference"],
                              help="a recipe's defaults, which explicit options still override: reference = the "
                                   "CTC-drafter reference code's (eagle1 layout, its losses, noise and optimiser; "
                                   "training/presets.py)")
    base_model: str = _opt("default", help="local HF folder, a .gguf file, or 'default' (embedded SmolLM2-135M-Instruct)")
    data: list = _opt([], action="append", required=True, metavar="DIR",
                      help="a folder written by `ctc-drafter distill` (repeat for several)")
    out: str = _opt("", required=True, metavar="CKPT",
                    help="output folder; CKPT itself then loads as --draft-model (latest epoch)")
    config: str | None = _opt(None, metavar="JSON",
                              help="DraftConfig overrides: inline JSON, e.g. '{\"num_context_layers\": 2}', or a "
                                   "JSON file (a draft's config.json works)")
    epochs: int = _opt(2, type=validate.int_in(1, 100_000))
    bs: int = _opt(4, type=validate.int_in(1, MAX_BATCH), help=f"sequences per process and step (1..{MAX_BATCH})")
    lr: float = _opt(3e-4, type=validate.finite_float(0.0, low_open=True),
                     help="peak learning rate (AdamW, warmup then --lr-schedule)")
    weight_decay: float = _opt(0.0, type=validate.finite_float(0.0))
    warmup: float = _opt(0.03, type=validate.finite_float(0.0), help="warmup: a fraction of all steps (<1) or a step count")
    grad_clip: float = _opt(1.0, type=validate.finite_float(0.0),
                            help="max gradient norm, or each element's with --clip value (0: off)")
    clip: str = _opt("norm", choices=["norm", "value"], help="clip the gradient's norm, or each element's value")
    lr_schedule: str = _opt("cosine", choices=["cosine", "linear"],
                            help="after warmup: cosine, or linear (transformers' get_linear_schedule_with_warmup) to 0")
    schedule_steps: int | None = _opt(None, type=validate.int_in(1, 1 << 40), metavar="N",
                                      help="the step at which the schedule reaches 0 (default: the run's last step)")
    loss: str | None = _opt(None, choices=LOSSES, help="ctc (default), ce (Medusa-style heads, no blank) or ctc+ce")
    frames: int | None = _opt(None, type=int, help="L, draft frames (default 8; with --arch ar: levels, 4)")
    layout: str | None = _opt(None, choices=LAYOUTS,
                              help="with --arch ar: standard (this project's layers and blank head), eagle1 (the "
                                   "reference code's: no input/final norm, the base's head, blank = token 0) or "
                                   "eagle3 (EAGLE-3's: fc over 3 base layers' states, for `export --format eagle3`; "
                                   "no feature loss, token weight 1, CTC 0.1; the base runs every step)")
    input_noise: float = _opt(0.0, type=validate.finite_float(0.0),
                              help="eagle1 layout: uniform noise on the input hidden states, amplitude x 512 / "
                                   "sequence length (the reference's data_noise: 0.2)")
    arch: str | None = _opt(None, choices=ARCHITECTURES,
                            help="nar: L frames from one state (default); ar: the reference code's EAGLE-style head "
                                 "drafting level by level (trained with feature regression + token CE + weighted CTC)")
    feature_weight: float | None = _ar_weight("feature")
    token_weight: float | None = _ar_weight("token")
    ctc_weight: float | None = _ar_weight("ctc")
    label_len: int | None = _opt(None, type=int, help="k, tokens the frames are trained to emit (default 6)")
    positions: int | str | None = _opt(None, type=_positions_arg, metavar="P|all",
                                       help="positions trained per sequence and epoch: all (every one, in one "
                                            "teacher-forced pass; the default with --arch ar) or P sampled ones "
                                            f"(the default with --arch nar: {SAMPLED_POSITIONS})")
    draft_vocab: int | None = _opt(None, type=int, metavar="N",
                                   help="propose from the N tokens most frequent in the training targets (0: the "
                                        "whole vocabulary, the default); the frame head shrinks from V to N rows, "
                                        "lossless")
    max_len: int = _opt(2048, type=int, help="truncate sequences to this many tokens")
    recover: int | None = _opt(None, type=int, metavar="N", help="resume from CKPT/state_N")
    first_epoch: int = _opt(1, type=validate.int_in(0, 1),
                            help="the first epoch's number: 1, or 0 as the seed's train/main.py counts (state_0 after "
                                 "the first epoch); --epochs is the last one's number")
    overwrite: bool = _opt(False, action="store_true", help="start afresh even if CKPT holds an earlier run")
    seed: int = _opt(0, type=validate.int_in(0, validate.MAX_SEED))
    eval_frac: float = _opt(0.02, type=validate.finite_float(0.0, 1.0), help="fraction of sequences held out for evaluation")
    log_every: int = _opt(10, type=int, help="steps between log.jsonl lines")
    loader_workers: int | None = _opt(None, type=int, metavar="N",
                                      help="DataLoader processes that read and pad the next batches during a step (0: "
                                           "in the training process; default: 1 when a core is free)")
    device: str = _opt("auto", type=validate.accepted_by(resolve_device),
                      help="auto, cpu, cuda (several GPUs: accelerate launch)")
    allow_incomplete: bool = _opt(False, action="store_true",
                                  help="train on a data folder whose distill run is unfinished or lacks shards (warns "
                                       "how much is missing) instead of refusing")
    trust_remote_code: bool = _opt(False, action="store_true",
                                   help="allow a base folder that ships its own Python code (auto_map) to run it")
    dtype: str = _opt("auto", help="base dtype: auto (bf16 on GPUs and on CPUs with AMX/AVX512-BF16: the draft then "
                                   "trains in bf16 autocast with fp32 weights; else fp32), float32, bfloat16, float16")

    @classmethod
    def from_args(cls, args) -> "TrainOptions":
        """The options of a parsed `ctc-drafter train` command line (other attributes are ignored)."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})


GIVEN = "given_options"  # the Namespace attribute listing the options set on the command line


def _recording(p, action):
    """argparse's `action` class, also noting its option in GIVEN: a --preset fills only what was not given."""
    base = p._registry_get("action", action, action)

    class Given(base):
        def __call__(self, parser, namespace, values, option_string=None):
            super().__call__(parser, namespace, values, option_string)
            setattr(namespace, GIVEN, getattr(namespace, GIVEN, frozenset()) | {self.dest})

    return Given


def add_train_args(p) -> None:
    """`ctc-drafter train`'s arguments, one per TrainOptions field."""
    for f in fields(TrainOptions):
        kw = dict(f.metadata["argparse"])
        if not kw.get("required"):
            kw["default"] = f.default
        kw["action"] = _recording(p, kw.get("action"))
        p.add_argument(f"--{f.name.replace('_', '-')}", *f.metadata["flags"], dest=f.name, **kw)


def check_options(opts: TrainOptions) -> None:
    for name, low in (("epochs", 1), ("bs", 1), ("max_len", 2), ("log_every", 1)):
        if getattr(opts, name) < low:
            raise CTCDrafterError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(opts, name)}")
    p = opts.positions
    if not (p is None or p == "all" or (isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= MAX_POSITIONS)):
        raise CTCDrafterError(f"--positions must be 'all' or a count in 1..{MAX_POSITIONS}, got {p!r}")
    if not opts.lr > 0:
        raise CTCDrafterError(f"--lr must be positive, got {opts.lr}")
    if opts.warmup < 0 or opts.grad_clip < 0 or opts.weight_decay < 0:
        raise CTCDrafterError("--warmup, --grad-clip and --weight-decay must be >= 0")
    if opts.recover is not None and opts.recover < opts.first_epoch:
        raise CTCDrafterError(f"--recover takes an epoch number >= {opts.first_epoch}, got {opts.recover}")
    if opts.epochs < opts.first_epoch:
        raise CTCDrafterError(f"--epochs (the last epoch's number) must be >= --first-epoch {opts.first_epoch}")
    if not 0 <= opts.eval_frac < 1:
        raise CTCDrafterError(f"--eval-frac must be in [0, 1), got {opts.eval_frac}")
    for d in opts.data:
        p = Path(d).expanduser()
        if not p.is_dir():
            raise CTCDrafterError(f"data folder not found: {d}")
        if not os.access(p, os.R_OK | os.X_OK):
            raise CTCDrafterError(f"data folder {d} is unreadable (permission denied)")
        # fail before loading the base when a folder is not (complete) distilled data
        check_shard_plan(plan_shards(p, read_manifest(p)), d, allow_incomplete=opts.allow_incomplete)


def resolve_positions(positions: int | str | None, every_position: bool) -> int | str:
    """--positions for a draft: as given, or the default (all where the draft trains every position in
    one pass, the AR draft; else SAMPLED_POSITIONS). 'all' for the NAR draft is refused: its training
    pass runs L frame queries per position against the whole context."""
    if positions is None:
        return "all" if every_position else SAMPLED_POSITIONS
    if positions == "all" and not every_position:
        raise CTCDrafterError("--positions all trains the autoregressive draft (--arch ar); the NAR draft "
                              f"samples positions (give a count, default {SAMPLED_POSITIONS})")
    return positions


def _inline_json(text: str) -> dict:
    import json

    try:
        obj = json.loads(text)
    except ValueError as e:
        raise CTCDrafterError(f"--config is not valid JSON ({str(e).splitlines()[0]}): {text}") from e
    if not isinstance(obj, dict):
        raise CTCDrafterError(f"--config must be a JSON object, got: {text}")
    return obj


def config_overrides(opts: TrainOptions) -> tuple[dict, str]:
    """DraftConfig fields from --config, then --frames/--label-len/--loss on top."""
    from dataclasses import fields

    from ..draft.config import DraftConfig

    over: dict = {}
    if opts.config:
        over = _inline_json(opts.config) if opts.config.lstrip().startswith("{") \
            else read_json_object(Path(opts.config).expanduser(), "--config")
        over.pop("model_type", None)
        names = {f.name for f in fields(DraftConfig)}
        unknown = sorted(set(over) - names)
        if unknown:
            raise CTCDrafterError(f"--config has unknown draft fields: {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        try:
            DraftConfig.check_field_types(over)
        except CTCDrafterError as e:
            raise CTCDrafterError(f"--config {opts.config}: {e}") from e
        over.pop("base_model", None)  # always the base being trained on
    if opts.frames is not None:
        over["num_frames"] = opts.frames
    if opts.draft_vocab is not None:
        over["draft_vocab"] = opts.draft_vocab
    if opts.label_len is not None:
        over["label_len"] = opts.label_len
    kind = opts.loss or ("ce" if over.get("loss") == "ce" else "ctc")
    over["loss"] = "ce" if kind == "ce" else "ctc"  # ctc+ce drafts still decode with CTC
    if opts.arch is not None:
        over["architecture"] = opts.arch
    if opts.layout is not None:
        over["layout"] = opts.layout
    if over.get("layout") in ("eagle1", "eagle3"):
        if over.setdefault("architecture", "ar") != "ar":
            raise CTCDrafterError(f"the {over['layout']} layout drafts level by level: it needs --arch ar")
    if over.get("layout") == "eagle3" and (opts.feature_weight or 0) > 0:
        raise CTCDrafterError("the eagle3 layout has no feature loss (its input is several base layers): "
                              "leave --feature-weight out or at 0")
    if over.get("architecture") == "ar":
        kind = _ar_loss_weights(opts, over)
    if over.get("layout") == "eagle1":
        # blank = token 0 is in the vocabulary whatever the CTC weight: the draft decodes with the CTC
        # transform, as the reference's evaluation scripts do, unless --loss ce asks for none
        kind = over["loss"] = "ce" if opts.loss == "ce" else "ctc"
        if opts.preset:
            over["extra"] = {**(over.get("extra") or {}), "preset": opts.preset}
    elif opts.input_noise > 0:
        raise CTCDrafterError("--input-noise needs the eagle1 layout (--layout eagle1, or --preset reference)")
    return over, kind


def _ar_loss_weights(opts: TrainOptions, over: dict) -> str:
    """--*-weight into the config (saved with the draft); CTC weight 0 (or --loss ce) is EAGLE-style:
    no blank symbol. Returns the loss kind ("ce" then, else "ctc")."""
    weights = dict((over.get("extra") or {}).get("ar_loss_weights", {}))
    for part in AR_LOSS_WEIGHTS:
        if getattr(opts, f"{part}_weight", None) is not None:
            weights[part] = getattr(opts, f"{part}_weight")
    if opts.loss == "ce":
        weights["ctc"] = 0.0
    weights = {**default_loss_weights(over.get("layout")), **weights}
    if not all(isinstance(w, (int, float)) and math.isfinite(w) and w >= 0 for w in weights.values()):
        raise CTCDrafterError(f"the AR loss weights must be finite numbers >= 0, got {weights}")
    if sum(weights.values()) == 0:  # the loss would be 0 at every step: nothing trains, yet it would "succeed"
        raise CTCDrafterError("--feature-weight, --token-weight and --ctc-weight are all 0: the total loss weight "
                              "must be positive (give at least one a weight > 0)")
    over["extra"] = {**(over.get("extra") or {}), "ar_loss_weights": weights}
    over["loss"] = "ce" if weights["ctc"] == 0 else "ctc"
    return over["loss"]


def precision(opts: TrainOptions, device: torch.device, cpu: CPU | None = None) -> tuple[torch.dtype, str]:
    """(base dtype, accelerate mixed precision). For auto: `accelerate launch --mixed_precision` decides, else
    bf16 on GPUs and on CPUs (`cpu`, default the host) with native bf16 matmuls, else fp32."""
    from ..models.base import resolve_dtype

    env = os.environ.get("ACCELERATE_MIXED_PRECISION")  # set (always) by `accelerate launch`: it decides then
    if opts.dtype in (None, "auto") and env is not None:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(env, torch.float32)
    else:
        # auto on a CPU with AMX / AVX512-BF16: bf16, whose autocast trained faster than fp32 with the
        # same loss curve (BENCHMARKS.md, "Training throughput on CPU"). Wider than decoding's auto (AMX
        # only): training needs no tree pass that rounds as a 1-token step does.
        cpu = cpu or host_cpu()
        cpu_bf16 = opts.dtype in (None, "auto") and device.type == "cpu" and cpu.has_bf16
        dtype = torch.bfloat16 if cpu_bf16 else resolve_dtype(opts.dtype, device, cpu)
    if dtype == torch.float16 and device.type == "cpu":
        raise CTCDrafterError("float16 training needs a GPU; on CPU use float32 or bfloat16")
    return dtype, {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
