"""The data plan of a distill run: the records to distil (after --limit), checked, with each data
file's hash, and their fixed split into shards (shard i = records [i*S, (i+1)*S))."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import CTCDrafterError
from .conversations import Conversation, Malformed, iter_records
from .distill_options import DistillOptions

MALFORMED_EXAMPLES = 5  # reasons the manifest keeps


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Plan:
    """The records to distil (after --limit) and their fixed split into shards."""

    records: list  # Conversation | Malformed, in file order
    inputs: list[dict]  # {"path", "sha256", "records"} per data file
    shard_size: int

    @property
    def num_shards(self) -> int:
        return math.ceil(len(self.records) / self.shard_size)

    def shard(self, i: int) -> tuple[int, list]:
        """(index of its first record, records) of shard i: records [i*S, (i+1)*S)."""
        first = i * self.shard_size
        return first, self.records[first : first + self.shard_size]

    def malformed(self) -> dict:
        bad = [r for r in self.records if isinstance(r, Malformed)]
        return {"count": len(bad), "examples": [r.reason for r in bad[:MALFORMED_EXAMPLES]]}


def read_plan(data_paths: list, opts: DistillOptions) -> Plan:
    """Read and check the data: one-line errors for missing, unreadable, unknown or unusable data."""
    opts.validate()
    paths = [Path(p) for p in data_paths]
    if not paths:
        raise CTCDrafterError("no data files given")
    for p in paths:
        if not p.is_file():
            raise CTCDrafterError(f"data file not found: {p}")
    records, inputs = [], []
    for p in paths:
        recs = list(iter_records([p]))
        records += recs
        inputs.append({"path": str(p.resolve()), "sha256": file_sha256(p), "records": len(recs)})
    records = records[: opts.limit]
    names = ", ".join(map(str, paths))
    if not records:
        raise CTCDrafterError(f"no records in {names}")
    convs = [r for r in records if isinstance(r, Conversation)]
    if not convs:
        raise CTCDrafterError(f"no usable records in {names}: all {len(records)} are malformed "
                              f"(first: {records[0].reason})")
    if opts.mode == "teacher-forced" and not any(c.replies for c in convs):
        raise CTCDrafterError(f"no record in {names} has a dataset answer, which --mode teacher-forced needs; "
                              f"use --mode regenerate to have the base model answer")
    return Plan(records, inputs, opts.shard_size)


def records_in(plan: Plan, shard_ids: list[int]) -> int:
    return sum(len(plan.shard(i)[1]) for i in shard_ids)
