"""`corpus build`: the corpus's conversations -> the training set `train --data` reads, on any machine.

    chunks --verified (sha256, arrays), base checked against their weights fingerprint-->
    conversations (ids, loss mask) in chunk order --shard i = conversations [i*S, (i+1)*S)-->
    one teacher-forced base pass per batch (labelling.label_batch): greedy targets (+ hidden states)
    --> shard_0000i.safetensors + .json, then manifest.json                 (distill_folder's own files)

`--workers N` deals the shards to N processes (data/worker_pool.py, as `distill --workers`).

The output folder is a distill folder in every respect (manifest, per-shard results, resume by
rerunning, `train`'s checks), so a rebuild interrupted anywhere continues where it stopped.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import CTCDrafterError
from .corpus import Chunk, check_same_base, corpus_base, corpus_summary, read_corpus
from .distill import progress_bar
from .distill_folder import dtype_name, finalize, new_manifest, pending_shards, prepare_out_dir, save_shard
from .distill_options import DistillOptions, Stats
from .distill_plan import Plan, records_in
from .examples import label_examples
from .shards import MANIFEST, read_manifest
from .worker_pool import BaseSpec, deal, describe_base, run_workers, threads_per_worker

PRODUCER = "ctc-drafter corpus build"


def read_checked_corpus(corpus_dir: Path, base_weights: dict, base_name: str) -> list[Chunk]:
    """Every chunk, verified, and written by the base given (same weights fingerprint)."""
    chunks = read_corpus(corpus_dir)
    if not chunks:
        raise CTCDrafterError(f"--corpus {corpus_dir} holds no chunks; add one with `ctc-drafter corpus add`")
    check_same_base(corpus_base(chunks), base_weights, str(corpus_dir), base_name)
    return chunks


def build_plan(chunks: list[Chunk], shard_size: int, limit: int | None = None) -> Plan:
    """The conversations of all chunks (the first `limit` of them), in order, as (ids, loss_mask) records."""
    records = [seq for c in chunks for seq in c.sequences()][:limit]
    inputs = [{"path": f"{c.name}.npz", "sha256": c.manifest["sha256"],
               "records": c.manifest["counts"]["conversations"]} for c in chunks]
    return Plan(records, inputs, shard_size)


def check_out_dir(out_dir: Path) -> None:
    """--out must be new, empty, or an earlier build of a corpus (which then resumes)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not (out_dir / MANIFEST).is_file():
        raise CTCDrafterError(f"--out {out_dir} holds other files; give an empty or new folder")
    producer = read_manifest(out_dir).get("producer")
    if producer != PRODUCER:
        raise CTCDrafterError(f"--out {out_dir} holds data written by {producer!r}, not a corpus build; "
                              f"give an empty or new folder")


def build_manifest(signature: dict, dtype: str, plan: Plan, opts: DistillOptions, chunks: list[Chunk]) -> dict:
    m = new_manifest(signature, dtype, plan, opts)
    c0 = chunks[0].manifest
    return {**m, "producer": PRODUCER, "corpus": {"base": c0["base"], **corpus_summary(chunks)}}


def make_corpus_shard(base, out_dir: Path, i: int, first: int, records: list, opts: DistillOptions,
                      worker: int = 0) -> int:
    """Label and save shard i of fixed (ids, loss_mask) records; its token count (as distill's make_shard)."""
    t0 = time.time()
    stats = Stats(records=len(records))
    seqs = label_examples(base, records, opts, stats)
    save_shard(out_dir, i, first, seqs, stats, time.time() - t0, worker)
    return stats.tokens


def build(base, chunks: list[Chunk], out_dir: Path, opts: DistillOptions, overwrite: bool = False,
          progress: bool = True) -> dict:
    """Label every conversation of `chunks` with `base` into shards under `out_dir`, resuming there."""
    opts.validate()
    out_dir = Path(out_dir)
    plan = build_plan(chunks, opts.shard_size, opts.limit)
    manifest = prepare_out_dir(out_dir, build_manifest(base.signature(), dtype_name(base.dtype), plan, opts, chunks),
                               overwrite)
    if manifest["complete"]:
        return manifest
    todo = pending_shards(out_dir, plan)
    with progress_bar(len(plan.records), len(plan.records) - records_in(plan, todo), progress, "corpus build") as report:
        for i in todo:
            first, records = plan.shard(i)
            report(len(records), make_corpus_shard(base, out_dir, i, first, records, opts))
    return finalize(out_dir, plan, manifest)


def build_with_workers(spec: BaseSpec, chunks: list[Chunk], out_dir: Path, opts: DistillOptions, workers: int,
                       overwrite: bool = False, progress: bool = True) -> dict:
    """`build` over `workers` processes on spec.device, each loading the base itself; the same shards
    come out as from one process (a shard depends only on its records), and a rerun resumes."""
    from ..models.base import resolve_device

    opts.validate()
    out_dir = Path(out_dir)
    plan = build_plan(chunks, opts.shard_size, opts.limit)
    signature, dtype, _ = describe_base(spec, resolve_device(spec.device))
    manifest = prepare_out_dir(out_dir, build_manifest(signature, dtype, plan, opts, chunks), overwrite)
    if manifest["complete"]:
        return manifest
    todo = pending_shards(out_dir, plan)
    n = min(workers, len(todo))
    with progress_bar(len(plan.records), len(plan.records) - records_in(plan, todo), progress, "corpus build") as report:
        run_workers(spec, [None] * n, threads_per_worker(n), (signature, dtype), opts, out_dir, deal(plan, todo, n),
                    report, make=make_corpus_shard)
    return finalize(out_dir, plan, manifest)


def build_options(chunks: list[Chunk], save_hidden: bool, shard_size: int, batch_size: int,
                  limit: int | None = None) -> DistillOptions:
    """Labelling options: the ids are fixed, so only the template (recorded) and the output layout matter."""
    c0 = chunks[0].manifest
    max_len = max(int(c.lengths.max(initial=2)) for c in chunks)
    return DistillOptions(mode="teacher-forced", template=c0.get("template") or "auto", max_len=max(max_len, 2),
                          shard_size=shard_size, save_hidden=save_hidden, batch_size=batch_size, limit=limit)
