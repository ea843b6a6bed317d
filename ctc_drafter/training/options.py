"""`train`'s options: the command-line arguments, their checks (before the base loads), the draft
config they make (--config with --frames/--label-len/--loss/--arch on top) and the precision."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..cli import checks
from ..data.shards import check_shard_plan, plan_shards, read_manifest
from ..draft.config import ARCHITECTURES
from ..errors import CTCDrafterError, read_json_object
from .losses import AR_LOSS_WEIGHTS, LOSSES

MAX_BATCH = 4096  # sequences per step: an epoch's batch plan is bs x steps indices


def add_train_args(p) -> None:
    p.add_argument("--base-model", default="default",
                   help="local HF folder, a .gguf file, or 'default' (embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", action="append", required=True, metavar="DIR",
                   help="a folder written by `ctc-drafter distill` (repeat for several)")
    p.add_argument("--out", required=True, metavar="CKPT",
                   help="output folder; CKPT itself then loads as --draft-model (latest epoch)")
    p.add_argument("--config", default=None, metavar="JSON",
                   help="DraftConfig overrides as JSON, e.g. {\"num_context_layers\": 2} (a draft's config.json works)")
    p.add_argument("--epochs", type=checks.int_in(1, 100_000), default=2)
    p.add_argument("--bs", type=checks.int_in(1, MAX_BATCH), default=4,
                   help=f"sequences per process and step (1..{MAX_BATCH})")
    p.add_argument("--lr", type=checks.finite_float(0.0, low_open=True), default=3e-4,
                   help="peak learning rate (AdamW, warmup then cosine)")
    p.add_argument("--weight-decay", type=checks.finite_float(0.0), default=0.0)
    p.add_argument("--warmup", type=checks.finite_float(0.0), default=0.03,
                   help="warmup: a fraction of all steps (<1) or a step count")
    p.add_argument("--grad-clip", type=checks.finite_float(0.0), default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--loss", default=None, choices=LOSSES,
                   help="ctc (default), ce (Medusa-style heads, no blank) or ctc+ce")
    p.add_argument("--frames", type=int, default=None, help="L, draft frames (default 8; with --arch ar: levels, 4)")
    p.add_argument("--arch", default=None, choices=ARCHITECTURES,
                   help="nar: L frames from one state (default); ar: the reference code's EAGLE-style head "
                        "drafting level by level (trained with feature regression + token CE + weighted CTC)")
    for part, default in AR_LOSS_WEIGHTS.items():
        p.add_argument(f"--{part}-weight", type=checks.finite_float(0.0), default=None,
                       help=f"with --arch ar: weight of the {part} loss (default {default}"
                            f"{'; 0 trains an EAGLE-style head without a blank' if part == 'ctc' else ''})")
    p.add_argument("--label-len", type=int, default=None, help="k, tokens the frames are trained to emit (default 6)")
    p.add_argument("--positions", type=checks.int_in(1, 1 << 16), default=32,
                   help="P, positions trained per sequence and epoch")
    p.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                   help="propose from the N tokens most frequent in the training targets (0: the whole "
                        "vocabulary, the default); the frame head shrinks from V to N rows, lossless")
    p.add_argument("--max-len", type=int, default=2048, help="truncate sequences to this many tokens")
    p.add_argument("--recover", type=int, default=None, metavar="N", help="resume from CKPT/state_N")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if CKPT holds an earlier run")
    p.add_argument("--seed", type=checks.int_in(0, checks.MAX_SEED), default=0)
    p.add_argument("--eval-frac", type=checks.finite_float(0.0, 1.0), default=0.02,
                   help="fraction of sequences held out for evaluation")
    p.add_argument("--log-every", type=int, default=10, help="steps between log.jsonl lines")
    p.add_argument("--loader-workers", type=int, default=None, metavar="N",
                   help="DataLoader processes that read and pad the next batches during a step (0: in the "
                        "training process; default: 1 when a core is free)")
    p.add_argument("--device", default="auto", type=checks.device,
                   help="auto, cpu, cuda (several GPUs: accelerate launch)")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="train on a data folder whose distill run is unfinished or lacks shards (warns how much "
                        "is missing) instead of refusing")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a base folder that ships its own Python code (auto_map) to run it")
    p.add_argument("--dtype", default="auto",
                   help="base dtype: auto (bf16 on GPUs and on CPUs with AMX/AVX512-BF16: the draft then trains "
                        "in bf16 autocast with fp32 weights; else fp32), float32, bfloat16, float16")


def check_options(args) -> None:
    for name, low in (("epochs", 1), ("bs", 1), ("positions", 1), ("max_len", 2), ("log_every", 1)):
        if getattr(args, name) < low:
            raise CTCDrafterError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if not args.lr > 0:
        raise CTCDrafterError(f"--lr must be positive, got {args.lr}")
    if args.warmup < 0 or args.grad_clip < 0 or args.weight_decay < 0:
        raise CTCDrafterError("--warmup, --grad-clip and --weight-decay must be >= 0")
    if args.recover is not None and args.recover < 1:
        raise CTCDrafterError(f"--recover takes an epoch number >= 1, got {args.recover}")
    if not 0 <= args.eval_frac < 1:
        raise CTCDrafterError(f"--eval-frac must be in [0, 1), got {args.eval_frac}")
    for d in args.data:
        p = Path(d).expanduser()
        if not p.is_dir():
            raise CTCDrafterError(f"data folder not found: {d}")
        if not os.access(p, os.R_OK | os.X_OK):
            raise CTCDrafterError(f"data folder {d} is unreadable (permission denied)")
        # fail before loading the base when a folder is not (complete) distilled data
        check_shard_plan(plan_shards(p, read_manifest(p)), d, allow_incomplete=args.allow_incomplete)


def config_overrides(args) -> tuple[dict, str]:
    """DraftConfig fields from --config, then --frames/--label-len/--loss on top."""
    from dataclasses import fields

    from ..draft.config import DraftConfig

    over: dict = {}
    if args.config:
        over = read_json_object(Path(args.config).expanduser(), "--config")
        over.pop("model_type", None)
        names = {f.name for f in fields(DraftConfig)}
        unknown = sorted(set(over) - names)
        if unknown:
            raise CTCDrafterError(f"--config has unknown draft fields: {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        try:
            DraftConfig.check_field_types(over)
        except CTCDrafterError as e:
            raise CTCDrafterError(f"--config {args.config}: {e}") from e
        over.pop("base_model", None)  # always the base being trained on
    if args.frames is not None:
        over["num_frames"] = args.frames
    if args.draft_vocab is not None:
        over["draft_vocab"] = args.draft_vocab
    if args.label_len is not None:
        over["label_len"] = args.label_len
    kind = args.loss or ("ce" if over.get("loss") == "ce" else "ctc")
    over["loss"] = "ce" if kind == "ce" else "ctc"  # ctc+ce drafts still decode with CTC
    if args.arch is not None:
        over["architecture"] = args.arch
    if over.get("architecture") == "ar":
        kind = _ar_loss_weights(args, over)
    return over, kind


def _ar_loss_weights(args, over: dict) -> str:
    """--*-weight into the config (saved with the draft); CTC weight 0 (or --loss ce) is EAGLE-style:
    no blank symbol. Returns the loss kind ("ce" then, else "ctc")."""
    weights = dict((over.get("extra") or {}).get("ar_loss_weights", {}))
    for part in AR_LOSS_WEIGHTS:
        if getattr(args, f"{part}_weight", None) is not None:
            weights[part] = getattr(args, f"{part}_weight")
    if args.loss == "ce":
        weights["ctc"] = 0.0
    over["extra"] = {**(over.get("extra") or {}), "ar_loss_weights": {**AR_LOSS_WEIGHTS, **weights}}
    over["loss"] = "ce" if over["extra"]["ar_loss_weights"]["ctc"] == 0 else "ctc"
    return over["loss"]


def precision(args, device: torch.device) -> tuple[torch.dtype, str]:
    """(base dtype, accelerate mixed precision). For auto: `accelerate launch --mixed_precision` decides, else
    bf16 on GPUs and on CPUs with native bf16 matmuls, else fp32."""
    from ..models.base import resolve_dtype

    env = os.environ.get("ACCELERATE_MIXED_PRECISION")  # set (always) by `accelerate launch`: it decides then
    if args.dtype in (None, "auto") and env is not None:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(env, torch.float32)
    else:
        # auto on a CPU with AMX / AVX512-BF16: bf16, whose autocast trained 1.3x faster than fp32 with the
        # same loss curve (BENCHMARKS.md)
        dtype = resolve_dtype(args.dtype, device)
    if dtype == torch.float16 and device.type == "cpu":
        raise CTCDrafterError("float16 training needs a GPU; on CPU use float32 or bfloat16")
    return dtype, {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
