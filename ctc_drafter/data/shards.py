"""Distillation shards: the contract between `distill` (writes) and `train` (reads).

A data folder holds
    manifest.json                      base model signature, template, options, per-shard counts
    shard_00000.safetensors ...        one file per shard, written atomically (tmp + rename)

Each shard stores its sequences flat, with offsets:
    input_ids  int32 [N]       the conversation tokens (prompt + assistant turns)
    targets    int32 [N]       the base model's own greedy next token at every position (KD targets)
    loss_mask  uint8 [N]       1 where the *next* token is an assistant token (positions that train)
    offsets    int64 [S+1]     sequence s is [offsets[s], offsets[s+1])
    hidden     float16 [N, d]  optional (--save-hidden): base last hidden states (after the final norm)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CTCDrafterError, read_json_object, write_json_atomic, writing

MANIFEST = "manifest.json"


@dataclass
class Sequence:
    input_ids: torch.Tensor  # [T] long
    targets: torch.Tensor  # [T] long
    loss_mask: torch.Tensor  # [T] bool
    hidden: torch.Tensor | None = None  # [T, d] float16


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


def write_shard(path: Path, seqs: list[Sequence]) -> None:
    """Write sequences as one shard file, atomically (a crash leaves no half-written shard)."""
    from safetensors.torch import save_file

    if not seqs:
        raise ValueError("empty shard")
    lens = [len(s.input_ids) for s in seqs]
    offsets = torch.zeros(len(seqs) + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(lens).cumsum(0)
    data = {
        "input_ids": torch.cat([s.input_ids for s in seqs]).to(torch.int32),
        "targets": torch.cat([s.targets for s in seqs]).to(torch.int32),
        "loss_mask": torch.cat([s.loss_mask for s in seqs]).to(torch.uint8),
        "offsets": offsets,
    }
    if all(s.hidden is not None for s in seqs):
        data["hidden"] = torch.cat([s.hidden for s in seqs]).to(torch.float16).contiguous()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with writing(path, "shard", kept="finished shards are kept; rerun the same command to resume"):
        try:
            save_file(data, str(tmp))
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


def read_shard(path: Path) -> list[Sequence]:
    from safetensors.torch import load_file

    try:
        d = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - corrupt or truncated file
        raise CTCDrafterError(f"shard {path} is unreadable: {e}") from e
    off = d["offsets"].tolist()
    hid = d.get("hidden")
    out = []
    for a, b in zip(off[:-1], off[1:]):
        out.append(Sequence(d["input_ids"][a:b].long(), d["targets"][a:b].long(), d["loss_mask"][a:b].bool(),
                            None if hid is None else hid[a:b]))
    return out


def write_manifest(directory: Path, manifest: dict) -> None:
    path = Path(directory) / MANIFEST
    with writing(path, kept="finished shards are kept; rerun the same command to resume"):
        write_json_atomic(path, manifest)


# Manifest fields a reader relies on, and their JSON types (absent is allowed: hand-made folders).
_MANIFEST_TYPES = {"base": dict, "shards": list, "complete": bool, "records": int, "shard_size": int}


def read_manifest(directory: Path) -> dict:
    """The folder's manifest, checked to be a JSON object with the field types readers rely on."""
    p = Path(directory) / MANIFEST
    if not p.is_file():
        raise CTCDrafterError(f"{directory} is not a distilled data folder (no {MANIFEST}); run `ctc-drafter distill`")
    m = read_json_object(p, "manifest")
    for key, kind in _MANIFEST_TYPES.items():
        if key in m and (not isinstance(m[key], kind) or (kind is int and isinstance(m[key], bool))):
            raise CTCDrafterError(f"{p} is corrupt: '{key}' must be a JSON {kind.__name__}, got {json.dumps(m[key])}")
    for entry in m.get("shards", []):
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or "/" in entry["file"]:
            raise CTCDrafterError(f"{p} is corrupt: every 'shards' entry needs a 'file' name in the folder")
    return m


@dataclass
class ShardPlan:
    """Which shard files of a data folder to read, and what is missing from them."""

    files: list[Path]
    expected: int  # shards the finished run has (or would have)
    missing: list[str]  # names of shards listed in the manifest but absent from the folder
    unfinished: bool  # the manifest says the distill run did not finish

    def problem(self, directory) -> str | None:
        if self.unfinished:
            return (f"{directory} is an unfinished distill run ({len(self.files)} of about {self.expected} shards "
                    f"written; {MANIFEST} says complete: false)")
        if self.missing:
            return (f"{directory} lacks {len(self.missing)} of its {self.expected} shards "
                    f"({', '.join(self.missing[:3])}{', ...' if len(self.missing) > 3 else ''})")
        return None


def plan_shards(directory: Path, manifest: dict) -> ShardPlan:
    """The shards `train` reads: those the manifest lists when it lists them (the contract), else
    every shard file in the folder (hand-made folders have no list)."""
    directory = Path(directory)
    present = sorted(p for p in directory.glob("shard_*.safetensors") if p.is_file())
    listed = [e["file"] for e in manifest.get("shards", [])]
    if manifest.get("complete") is False:
        size = manifest.get("shard_size") or 0
        expected = -(-manifest.get("records", 0) // size) if size else len(present)
        return ShardPlan(present, max(expected, len(present)), [], True)
    if not listed:
        return ShardPlan(present, len(present), [], False)
    files = [directory / name for name in listed]
    missing = [p.name for p in files if not p.is_file()]
    return ShardPlan([p for p in files if p.is_file()], len(listed), missing, False)


def check_shard_plan(plan: ShardPlan, directory, allow_incomplete: bool) -> str | None:
    """Refuse a folder with missing shards; with allow_incomplete, the warning to print instead."""
    problem = plan.problem(directory)
    if problem is None:
        return None
    if not allow_incomplete:
        raise CTCDrafterError(f"{problem}: training on it would silently use part of the data; finish it with the "
                              "same `ctc-drafter distill` command, or pass --allow-incomplete to train on what is "
                              "there")
    return f"{problem}; training on the {len(plan.files)} shard(s) present (--allow-incomplete)"


def check_manifest_matches(manifest: dict, base) -> None:
    """A data folder made with another base or tokenizer must not train a draft for this one."""
    sig = manifest.get("base", {})
    mine = base.signature()
    for key in ("hidden_size", "vocab_size", "base_model"):
        if key in sig and sig[key] != mine[key]:
            raise CTCDrafterError(
                f"data was distilled from {sig.get('base_model')} ({key} {sig[key]}), but the base is "
                f"{mine['base_model']} ({key} {mine[key]})")
