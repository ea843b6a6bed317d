"""A distill run's output folder: the manifest (what the data is, and whether it is complete), each
shard's result file (its counts; its presence marks the shard finished), resuming a folder made
with the same settings, making and saving one shard, and gathering the results when all are done."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..errors import CTCDrafterError, write_json_atomic, writing
from .distill_options import DistillOptions, Stats
from .distill_plan import Plan
from .examples import label_shard
from .shards import MANIFEST, Sequence, read_manifest, shard_name, write_manifest, write_shard

FORMAT = 1  # manifest format


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def software_versions() -> dict:
    """What wrote the data (the manifest keeps it; `corpus add` passes it on)."""
    import transformers

    from .. import __version__

    return {"ctc_drafter": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def new_manifest(signature: dict, dtype: str, plan: Plan, opts: DistillOptions) -> dict:
    return {
        "format": FORMAT,
        "producer": "ctc-drafter distill",
        "software": software_versions(),
        "base": signature,
        "dtype": dtype,
        "template": opts.template,
        "mode": opts.mode,
        "hidden": opts.save_hidden,
        "options": opts.content_key(),
        "inputs": plan.inputs,
        "records": len(plan.records),
        "shard_size": opts.shard_size,
        "shards": [],  # {"file", "index", "first", "records", "sequences", "tokens", "assistant_tokens"}
        "malformed": plan.malformed(),
        "stats": Stats().to_dict(),
        "complete": False,
    }


def _identity(m: dict) -> dict:
    """What must match for a run to continue a folder's data."""
    return {"format": m.get("format"), "base": m.get("base"), "dtype": m.get("dtype"), "options": m.get("options"),
            "inputs": [s.get("sha256") for s in m.get("inputs", [])]}


def _describe_mismatch(old: dict, new: dict) -> str:
    a, b = _identity(old), _identity(new)
    diffs = []
    for k in a:
        if a[k] == b[k]:
            continue
        if isinstance(a[k], dict) and isinstance(b[k], dict):
            diffs += [f"{kk} {a[k].get(kk)!r} -> {b[k].get(kk)!r}" for kk in sorted(set(a[k]) | set(b[k]))
                      if a[k].get(kk) != b[k].get(kk)]
        elif k == "inputs":
            diffs.append("the data files differ")
        else:
            diffs.append(f"{k} {a[k]!r} -> {b[k]!r}")
    return ", ".join(diffs)


def result_name(i: int) -> str:
    """Shard i's counts; its presence marks the shard finished."""
    return shard_name(i).replace(".safetensors", ".json")


def _owned_files(out_dir: Path) -> list[Path]:
    """Files distill writes (and may therefore delete)."""
    pats = ("shard_*.safetensors", "shard_*.json", "shard_*.tmp", MANIFEST, MANIFEST + ".tmp")
    return [p for pat in pats for p in out_dir.glob(pat)]


def _own_manifest(path: Path, producer: str) -> bool:
    """A manifest this command wrote (it names `producer`: distill, or corpus build, which writes the
    same folders), so a rerun may resume it and --overwrite may replace it."""
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and m.get("producer") == producer


def prepare_out_dir(out_dir: Path, fresh: dict, overwrite: bool, write: bool = True) -> dict:
    """The manifest to continue from: `fresh` for a new or overwritten folder, else the folder's own.

    write=False makes the same checks and decision without touching the folder (the other processes
    of a launch, while the main one prepares it).
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise CTCDrafterError(f"--out {out_dir} is a file, not a folder")
    producer = fresh.get("producer", "ctc-drafter distill")
    if (out_dir / MANIFEST).exists() and not _own_manifest(out_dir / MANIFEST, producer):
        raise CTCDrafterError(f"--out {out_dir} holds a {MANIFEST} that {producer} did not write; give an empty or "
                              "new folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    owned = set(_owned_files(out_dir))
    foreign = [p for p in out_dir.iterdir() if p not in owned]
    if foreign:
        raise CTCDrafterError(f"--out {out_dir} holds files distill did not write (e.g. {foreign[0].name}); "
                              f"give an empty or new folder")
    if overwrite or not (out_dir / MANIFEST).is_file():
        if write:
            for p in owned:
                p.unlink(missing_ok=True)
            write_manifest(out_dir, fresh)
        return fresh
    old = read_manifest(out_dir)
    if _identity(old) != _identity(fresh):
        raise CTCDrafterError(f"{out_dir} holds data distilled with other settings ({_describe_mismatch(old, fresh)}); "
                              f"use --overwrite or another --out")
    if old.get("records", 0) > fresh["records"]:
        raise CTCDrafterError(f"{out_dir} already holds the first {old['records']} records; "
                              f"--limit {fresh['records']} asks for fewer (use --overwrite or another --out)")
    if old.get("complete") and old.get("records") == fresh["records"]:
        return old
    if write:
        for p in owned:  # half-written files a crash left
            if p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)
        write_manifest(out_dir, fresh)  # records, malformed: the new --limit's
    return fresh


def _read_result(out_dir: Path, i: int) -> dict | None:
    try:
        return json.loads((out_dir / result_name(i)).read_text())
    except (OSError, ValueError):
        return None


def shard_done(out_dir: Path, plan: Plan, i: int) -> bool:
    """Finished: its .json exists, covers the records the plan gives it, and its tensors are there."""
    r = _read_result(out_dir, i)
    first, records = plan.shard(i)
    return (r is not None and r.get("first") == first and r.get("records") == len(records)
            and (r.get("file") is None or (out_dir / r["file"]).is_file()))


def pending_shards(out_dir: Path, plan: Plan) -> list[int]:
    return [i for i in range(plan.num_shards) if not shard_done(out_dir, plan, i)]


def save_shard(out_dir: Path, i: int, first: int, seqs: list[Sequence], stats: Stats, seconds: float,
               worker: int = 0) -> dict:
    """Shard i's tensors, then its counts (the order makes the .json the 'finished' mark)."""
    (out_dir / result_name(i)).unlink(missing_ok=True)  # a redone shard is unfinished until the end
    name = shard_name(i)
    if seqs:
        write_shard(out_dir / name, seqs)
    else:  # every record skipped: no tensors, and none left from an earlier, longer version of it
        (out_dir / name).unlink(missing_ok=True)
    result = {"index": i, "file": name if seqs else None, "first": first, "records": stats.records,
              "sequences": len(seqs), "tokens": stats.tokens, "assistant_tokens": stats.assistant_tokens,
              "seconds": round(seconds, 2), "worker": worker, "stats": stats.to_dict()}
    with writing(out_dir / result_name(i), kept="finished shards are kept; rerun the same command to resume"):
        write_json_atomic(out_dir / result_name(i), result, indent=1)
    return result


def make_shard(base, out_dir: Path, i: int, first: int, records: list, opts: DistillOptions, worker: int = 0) -> int:
    """Label and save shard i (records [first, first + len(records))); its token count."""
    t0 = time.time()
    seqs, stats = label_shard(base, records, opts, first)
    save_shard(out_dir, i, first, seqs, stats, time.time() - t0, worker)
    return stats.tokens


def run_shards(base, plan: Plan, shard_ids: list[int], out_dir: Path, opts: DistillOptions, report=None,
               worker: int = 0) -> None:
    """Make the given shards in this process; report(records, tokens) after each."""
    for i in shard_ids:
        first, records = plan.shard(i)
        tokens = make_shard(base, out_dir, i, first, records, opts, worker)
        if report is not None:
            report(len(records), tokens)


def finalize(out_dir: Path, plan: Plan, manifest: dict) -> dict:
    """Gather every shard's counts into the manifest and mark it complete."""
    results = [_read_result(out_dir, i) for i in range(plan.num_shards)]
    missing = [i for i, r in enumerate(results) if r is None or not shard_done(out_dir, plan, i)]
    if missing:
        raise CTCDrafterError(f"shard {missing[0]} of {out_dir} is not finished ({len(missing)} missing); "
                              f"run the same command again to make it")
    total = Stats()
    for r in results:
        total.add(Stats.from_dict(r["stats"]))
    shards = [{k: r[k] for k in ("file", "index", "first", "records", "sequences", "tokens", "assistant_tokens")}
              for r in results if r["file"]]
    if not shards:
        skipped = ", ".join(f"{n} {r}" for r, n in total.skipped.items())
        raise CTCDrafterError(f"no usable records (skipped: {skipped or 'none'}; malformed: {total.malformed})")
    manifest = {**manifest, "shards": shards, "stats": total.to_dict(), "complete": True,
                "seconds": round(sum(r["seconds"] for r in results), 1)}
    write_manifest(out_dir, manifest)
    return manifest
