"""`ctc-drafter train`: fit a CTC draft to a frozen base on distilled shards.

Runs as a plain command (one device) or under `accelerate launch` (DDP over GPUs/nodes; FSDP and
DeepSpeed configs pass through accelerate untouched). The base stays frozen and outside the
optimiser: it only supplies hidden states (when the shards do not store them) and its embedding and
LM head, which the draft borrows.

Output folder (--out CKPT):
    config.json, model.safetensors   the latest finished epoch's draft: `--draft-model CKPT` loads it
    epoch_N/                         the draft after epoch N (loadable the same way)
    state_N/                         accelerate state after epoch N (model, optimizer, scheduler, RNG)
                                     + trainer_state.json (epoch, step, data plan): `--recover N`
    log.jsonl                        one line per logging step and per epoch
    train_args.json                  the run's TrainOptions, with a summary of its data
Every folder is written under a temporary name and renamed when complete, and state_N is written
last, so an interrupted run never loses a finished epoch.

Batches: --bs sequences per process and step (the global batch is bs x processes). Each epoch
visits the training sequences in an order fixed by (seed, epoch), and each sequence trains every
position (--positions all, the AR draft's default) or up to --positions P positions fixed by (seed,
epoch, sequence): a resumed run sees exactly the batches the uninterrupted run would have.

This module is the command (`run_training`); the pieces live in files named after what they hold:
options.py (TrainOptions, checks, draft config, precision), trainer.py (the loop), evaluate.py (loss and
held-out metrics), checkpoints.py (the output folder), run_log.py (log.jsonl).
"""

from __future__ import annotations

import logging

import argparse
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..errors import CTCDrafterError, fault_reason, write_json_atomic, writing
from .checkpoints import RUN_ARGS, TRAINER_STATE, check_out_folder, clear_run, existing_states
from .data import data_fingerprint, load_sequences, most_frequent_targets, split_eval
from .evaluate import evaluate_draft
from .options import GIVEN, TrainOptions, add_train_args, check_options, config_overrides, precision, resolve_positions
from .presets import apply_preset
from .reference_trainer import ReferenceTrainer
from .trainer import Trainer

log = logging.getLogger(__name__)

__all__ = ["TrainOptions", "add_train_args", "evaluate_draft", "run_training"]


def _raise_if_output_fault(e: Exception, out: Path) -> None:
    """A full or read-only --out mid-run: one line naming the folder, the reason and what is kept."""
    reason = fault_reason(e)
    if reason is None:
        return
    name = getattr(e, "filename", None)
    done = existing_states(out) if out.is_dir() else []
    kept = (f"epochs {done[0]}..{done[-1]} are kept (resume with --recover {done[-1]})" if done
            else "no epoch had finished")
    raise CTCDrafterError(f"cannot write the training run in {out}{f' ({name})' if name else ''}: {reason}; "
                          f"{kept}") from e


def run_training(opts: TrainOptions | argparse.Namespace) -> int:
    """The whole command: check inputs, load, (resume,) train, save. Returns an exit code.

    `opts`: a TrainOptions (the Python API), or the parsed `ctc-drafter train` command line."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import set_seed

    from ..draft import new_ar_draft_for, new_draft_for, new_eagle1_draft_for, new_eagle3_draft_for
    from ..models.base import load_base_model, resolve_device

    if not isinstance(opts, TrainOptions):
        opts = apply_preset(TrainOptions.from_args(opts), getattr(opts, GIVEN, frozenset()))
    else:
        opts = apply_preset(opts)
    check_options(opts)
    # under autocast RMSNorm sees bf16 activations with fp32 weights and says so on every run: expected
    warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
    out = Path(opts.out).expanduser()
    if out.exists() and not out.is_dir():
        raise CTCDrafterError(f"--out {opts.out} exists and is not a folder")
    check_out_folder(out)
    if opts.recover is not None:
        have = existing_states(out) if out.is_dir() else []
        if opts.recover not in have or not (out / f"state_{opts.recover}" / TRAINER_STATE).is_file():
            found = ", ".join(f"state_{n}" for n in have) or "none"
            raise CTCDrafterError(f"cannot recover: {out / f'state_{opts.recover}'} does not exist (found: {found})")
    elif out.is_dir() and existing_states(out) and not opts.overwrite:
        raise CTCDrafterError(f"{out} already holds a training run (state_{existing_states(out)[-1]}); "
                              "resume it with --recover N, or pass --overwrite or another --out")
    overrides, kind = config_overrides(opts)

    device = resolve_device(opts.device)
    base_dtype, mixed = precision(opts, device)
    if PartialState._shared_state and not torch.distributed.is_initialized():
        # a single-process state left by earlier in-process work (another command, a test) may have
        # another device or precision; this command sets its own
        AcceleratorState._reset_state(reset_partial_state=True)
    fresh_state = not PartialState._shared_state  # we own accelerate's global state: reset it when done
    acc = Accelerator(cpu=device.type == "cpu", mixed_precision=mixed, step_scheduler_with_optimizer=False)
    try:
        set_seed(opts.seed)
        base = load_base_model(opts.base_model, device=acc.device, dtype=base_dtype,
                               trust_remote_code=opts.trust_remote_code)
        for key in ("hidden_size", "vocab_size"):  # a config.json of a draft for another base
            if key in overrides and overrides[key] != int(getattr(base.config, key)):
                raise CTCDrafterError(f"--config {opts.config} has {key} {overrides[key]}, but base {base.name} has "
                                      f"{getattr(base.config, key)}; it is a config for another base")
        eagle1 = overrides.get("layout") == "eagle1"
        new = new_eagle1_draft_for if eagle1 else new_eagle3_draft_for if overrides.get("layout") == "eagle3" \
            else new_ar_draft_for if overrides.get("architecture") == "ar" else new_draft_for
        draft = new(base, seed=opts.seed, **overrides)
        # fp32 master weights (fp64 only next to an fp64 base); bf16/fp16 come from autocast
        draft = draft.to(torch.float64 if base_dtype == torch.float64 else torch.float32)
        opts = replace(opts, positions=resolve_positions(opts.positions, getattr(draft, "every_position", False)))
        if kind == "ce" and not eagle1:
            draft.blank_head.requires_grad_(False)  # unused without a blank; DDP must not wait for its grad
        max_len = min(opts.max_len, base.max_length)
        seqs, summaries = load_sequences(opts.data, base, draft.config.label_len, max_len, opts.allow_incomplete)
        if draft.config.layout == "eagle3":  # it reads several base layers, never the stored last state
            seqs = [replace(s, has_hidden=False) for s in seqs]
        train_seqs, eval_seqs = split_eval(seqs, opts.eval_frac, opts.seed)
        if draft.config.draft_vocab:  # from the training split only; --recover restores the saved list
            draft.set_vocab(most_frequent_targets(train_seqs, draft.config.draft_vocab))
        trainer = (ReferenceTrainer if eagle1 else Trainer)(opts, acc, base, draft, kind, train_seqs, eval_seqs,
                                                            data_fingerprint(seqs), out)
        if acc.is_main_process:
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise CTCDrafterError(f"cannot create --out {opts.out}: {e.strerror}") from e
            if opts.recover is None:
                clear_run(out)  # --overwrite: no stale epochs, states or log lines of the earlier run
            with writing(out / RUN_ARGS):
                write_json_atomic(out / RUN_ARGS, {**asdict(opts), "loss_kind": kind,
                                                   "data_summary": summaries, "train_sequences": len(train_seqs),
                                                   "eval_sequences": len(eval_seqs),
                                                   "num_processes": acc.num_processes, "mixed_precision": mixed})
            arch = " AR" if draft.config.architecture == "ar" else ""
            log.info(f"training a {kind}{arch} draft ({sum(p.numel() for p in draft.parameters()) / 1e6:.1f}M "
                     f"params) on {len(train_seqs)} sequences ({len(eval_seqs)} held out), {trainer.steps_per_epoch} "
                     f"steps/epoch x {opts.epochs} epochs, {acc.num_processes} process(es), {acc.device}, "
                     f"mixed precision {mixed}")
        acc.wait_for_everyone()
        if opts.recover is not None:
            trainer.resume(opts.recover)
            if trainer.start_epoch > opts.epochs and acc.is_main_process:
                log.info("state_%s already has all %d epochs; nothing to train", opts.recover, opts.epochs)
        try:
            records = trainer.fit()
        except Exception as e:  # noqa: BLE001 - only file-system faults are converted
            _raise_if_output_fault(e, out)
            raise
        if acc.is_main_process and records:
            last = records[-1]
            log.info("done; draft in %s (epoch %s), est. accept length %s", out, last["epoch"], last["est_accept_len"])
    finally:
        if fresh_state and acc.num_processes == 1:
            AcceleratorState._reset_state(reset_partial_state=True)
    return 0
