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

from ..errors import CTCDrafterError

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
    save_file(data, str(tmp))
    os.replace(tmp, path)


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
    directory = Path(directory)
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, directory / MANIFEST)


def read_manifest(directory: Path) -> dict:
    p = Path(directory) / MANIFEST
    if not p.is_file():
        raise CTCDrafterError(f"{directory} is not a distilled data folder (no {MANIFEST}); run `ctc-drafter distill`")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CTCDrafterError(f"{p} is corrupt: {e}") from e


def check_manifest_matches(manifest: dict, base) -> None:
    """A data folder made with another base or tokenizer must not train a draft for this one."""
    sig = manifest.get("base", {})
    mine = base.signature()
    for key in ("hidden_size", "vocab_size", "base_model"):
        if key in sig and sig[key] != mine[key]:
            raise CTCDrafterError(
                f"data was distilled from {sig.get('base_model')} ({key} {sig[key]}), but the base is "
                f"{mine['base_model']} ({key} {mine[key]})")
