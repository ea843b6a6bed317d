"""Distillation: chat data -> training shards labelled by the frozen base model.

    records --(mode "regenerate")-------> the base answers every user turn itself, greedy, seeing its
                                          own earlier replies (the draft learns the base's continuations)
            --(mode "teacher-forced")---> the dataset's own answers are kept
            --chat template-------------> ids + assistant mask, cut to --max-len
            --one base pass-------------> the base's greedy next token at every position (+ hidden states)
            --shard i = records [i*S, (i+1)*S)--> shard_0000i.safetensors + shard_0000i.json (its counts)

The record -> shard assignment is fixed by the data and --shard-size alone, so shards can be made in
any order, by any number of processes (`--workers`, `--gpus`, `accelerate launch`), and a rerun
redoes only shards without their .json: the result is the same files as one uninterrupted process.
A shard's .json is written after its tensors (both atomically), so Ctrl-C never leaves a shard that
looks finished but is not. When every shard is done, one process gathers the .json files into
manifest.json and marks it complete.

This module holds the three drivers (one process, `accelerate launch`, a worker pool) and is the
public entry: the pieces live in files named after what they hold, and their public names are
re-exported here.

    distill_options.py   DistillOptions (what a run is asked to do), Stats (what it counted)
    distill_plan.py      the records to distil and their fixed split into shards
    labelling.py         the base's passes: greedy labels, batched replies, reply seeds
    examples.py          conversations -> ids + loss mask + targets, for one shard's records
    distill_folder.py    the output folder: manifest, per-shard results, resume, saving a shard
    worker_pool.py       --workers / --gpus: spawned worker processes
    shards.py            the shard file format (the contract with `train`)
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import CTCDrafterError
from .distill_folder import dtype_name, finalize, new_manifest, pending_shards, prepare_out_dir, run_shards, shard_done
from .distill_options import MODE_ALIASES, MODES, DistillOptions, Stats
from .distill_plan import Plan, read_plan, records_in
from .labelling import label_batch, require_tokenizer
from .worker_pool import (BaseSpec, check_gpu_groups, deal, describe_base, parse_gpu_groups, run_workers,
                          threads_per_worker, visible_devices)

__all__ = ["MODES", "MODE_ALIASES", "DistillOptions", "Stats", "Plan", "read_plan", "BaseSpec", "describe_base",
           "parse_gpu_groups", "check_gpu_groups", "new_manifest", "prepare_out_dir", "pending_shards", "label_batch",
           "distill", "distill_data_parallel", "distill_with_workers", "launched_distributed", "distributed_state"]



# --------------------------------------------------------------------------- one process


@contextmanager
def progress_bar(total: int, initial: int, enabled: bool, desc: str = "distill"):
    """A tqdm bar over records, with tokens/s; yields report(records, tokens) to advance it."""
    from tqdm.auto import tqdm

    t0, tokens = time.time(), [0]
    with tqdm(total=total, initial=initial, unit="rec", desc=desc, disable=not enabled, dynamic_ncols=True,
              file=sys.stderr) as bar:
        def report(records: int, new_tokens: int) -> None:
            tokens[0] += new_tokens
            bar.update(records)
            bar.set_postfix_str(f"{tokens[0] / max(time.time() - t0, 1e-9):.0f} tok/s")

        yield report



def distill(base, data_paths: list[Path], out_dir: Path, opts: DistillOptions, overwrite: bool = False,
            progress: bool = True, plan: Plan | None = None) -> dict:
    """Distil `data_paths` into shards under `out_dir` in this process, resuming a run left unfinished there."""
    opts.validate()
    require_tokenizer(base)
    plan = plan or read_plan(data_paths, opts)
    out_dir = Path(out_dir)
    manifest = prepare_out_dir(out_dir, new_manifest(base.signature(), dtype_name(base.dtype), plan, opts), overwrite)
    if manifest["complete"]:
        return manifest
    todo = pending_shards(out_dir, plan)
    with progress_bar(len(plan.records), len(plan.records) - records_in(plan, todo), progress) as report:
        run_shards(base, plan, todo, out_dir, opts, report)
    return finalize(out_dir, plan, manifest)


# --------------------------------------------------------------------------- accelerate launch


def launched_distributed() -> bool:
    """Started by `accelerate launch` / torchrun with several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def distributed_state(cpu: bool):
    """accelerate's PartialState for this launch. Processes wait for each other only at the start and
    at the end, possibly for as long as a shard takes, hence the long timeout."""
    from datetime import timedelta

    from accelerate import PartialState

    state = PartialState(cpu=cpu, timeout=timedelta(hours=24))
    if state.num_processes != int(os.environ["WORLD_SIZE"]):
        raise CTCDrafterError(f"launched as {os.environ['WORLD_SIZE']} processes but accelerate sees "
                              f"{state.num_processes}; on a machine without GPUs pass --device cpu")
    return state


def distill_data_parallel(state, base, data_paths: list[Path], out_dir: Path, opts: DistillOptions,
                          overwrite: bool = False, progress: bool = True, plan: Plan | None = None) -> dict | None:
    """`distill` as one of the processes of a launch: process r makes shards r, r+n, ... (those not
    finished yet); the main process prepares the folder first and writes the manifest last.

    Every process runs the same checks on the same inputs, so a bad input stops all of them alike
    before anyone waits for the others. Returns the manifest on the main process, None elsewhere.
    """
    opts.validate()
    require_tokenizer(base)
    plan = plan or read_plan(data_paths, opts)
    out_dir = Path(out_dir)
    fresh = new_manifest(base.signature(), dtype_name(base.dtype), plan, opts)
    manifest = prepare_out_dir(out_dir, fresh, overwrite, write=state.is_main_process)
    if manifest["complete"]:
        return manifest if state.is_main_process else None
    state.wait_for_everyone()  # the folder is ready
    mine = [i for i in range(state.process_index, plan.num_shards, state.num_processes)
            if not shard_done(out_dir, plan, i)]
    desc = f"distill [{state.process_index + 1}/{state.num_processes}]"
    with progress_bar(records_in(plan, mine), 0, progress and state.is_main_process, desc) as report:
        run_shards(base, plan, mine, out_dir, opts, report, worker=state.process_index)
    state.wait_for_everyone()  # every shard is written
    return finalize(out_dir, plan, manifest) if state.is_main_process else None



# --------------------------------------------------------------------------- worker processes (--workers, --gpus)


def distill_with_workers(spec: BaseSpec, data_paths: list[Path], out_dir: Path, opts: DistillOptions,
                         gpu_groups: list[list[int]] | None = None, workers: int = 1, overwrite: bool = False,
                         progress: bool = True, plan: Plan | None = None) -> dict:
    """`distill` over worker processes: one per GPU group (`--gpus`), else `workers` on spec.device.

    The shards still to make are dealt out round-robin; each worker loads the base itself. The same
    shards come out as from one process, and an interrupted run resumes from whatever was finished.
    """
    from ..models.base import resolve_device

    opts.validate()
    plan = plan or read_plan(data_paths, opts)
    out_dir = Path(out_dir)
    device = torch.device("cuda") if gpu_groups else resolve_device(spec.device)
    signature, dtype, _ = describe_base(spec, device)
    manifest = prepare_out_dir(out_dir, new_manifest(signature, dtype, plan, opts), overwrite)
    if manifest["complete"]:
        return manifest
    todo = pending_shards(out_dir, plan)
    slots = [visible_devices(g) for g in gpu_groups] if gpu_groups else [None] * workers
    slots = slots[: len(todo)]  # no idle workers
    threads = None if gpu_groups else threads_per_worker(len(slots))
    with progress_bar(len(plan.records), len(plan.records) - records_in(plan, todo), progress) as report:
        run_workers(spec, slots, threads, (signature, dtype), opts, out_dir, deal(plan, todo, len(slots)), report)
    return finalize(out_dir, plan, manifest)
