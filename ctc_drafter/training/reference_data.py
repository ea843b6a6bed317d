"""Whole-sequence batches for the reference recipe (training/reference_losses.py): every position of each
sequence in one teacher-forced pass, no sampled positions, no label windows.

For a sequence of T tokens x with distilled loss mask m (m[t] = 1 where token t+1 is an assistant token):

    draft input at t    h_t, x_{t+1} (the token there, as the reference's shifted `input_ids`; 0 at T-1)
    trained at t        r[t] = m[t-1] and t < T-1: the reference's mask marks token t itself as an
                        assistant token, and its last position has no h_{t+1} to regress
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .data import HiddenReader, TrainSequence


@dataclass
class FullBatch:
    input_ids: torch.Tensor  # [B,T] long (right-padded with 0)
    next_ids: torch.Tensor  # [B,T] long: x_{t+1} (0 at each sequence's last position and in padding)
    hidden: torch.Tensor | None  # [B,T,d] stored hidden states, or None (compute with the base)
    trained: torch.Tensor  # [B,T] bool
    lengths: torch.Tensor  # [B] long
    num_sequences: int

    def to(self, device) -> "FullBatch":
        mv = lambda x: None if x is None else x.to(device, non_blocking=True)  # noqa: E731
        return FullBatch(mv(self.input_ids), mv(self.next_ids), mv(self.hidden), mv(self.trained), mv(self.lengths),
                         self.num_sequences)

    def pin_memory(self) -> "FullBatch":
        mv = lambda x: None if x is None else x.pin_memory()  # noqa: E731
        return FullBatch(mv(self.input_ids), mv(self.next_ids), mv(self.hidden), mv(self.trained), mv(self.lengths),
                         self.num_sequences)


class MaskReader:
    """The distilled loss mask of a sequence, read from its shard (one read per shard)."""

    def __init__(self):
        self._masks: dict[Path, torch.Tensor] = {}

    def get(self, seq: TrainSequence) -> torch.Tensor:  # -> [T] bool
        from safetensors import safe_open

        m = self._masks.get(seq.shard)
        if m is None:
            with safe_open(str(seq.shard), "pt") as f:
                m = self._masks[seq.shard] = f.get_tensor("loss_mask").bool()
        a, b = seq.span
        return m[a:b]


def reference_trained(loss_mask: torch.Tensor) -> torch.Tensor:
    """loss_mask [T] bool (m[t]: token t+1 is an assistant token) -> [T] bool: r[t] = m[t-1], last dropped."""
    r = torch.zeros_like(loss_mask, dtype=torch.bool)
    r[1:] = loss_mask[:-1]
    r[-1:] = False
    return r


def full_batch(seqs: list[TrainSequence], masks: MaskReader, hidden_reader: HiddenReader | None) -> FullBatch:
    """Right-pad whole sequences into one batch (stored hidden states when every sequence has them)."""
    B = len(seqs)
    T = max(len(s.input_ids) for s in seqs)
    ids = torch.zeros(B, T, dtype=torch.long)
    nxt = torch.zeros(B, T, dtype=torch.long)
    trained = torch.zeros(B, T, dtype=torch.bool)
    lengths = torch.tensor([len(s.input_ids) for s in seqs])
    use_hidden = hidden_reader is not None and all(s.has_hidden for s in seqs)
    hidden = None
    for b, s in enumerate(seqs):
        n = len(s.input_ids)
        ids[b, :n] = s.input_ids
        nxt[b, : n - 1] = s.input_ids[1:]
        trained[b, :n] = reference_trained(masks.get(s))
        if use_hidden:
            h = hidden_reader.get(s)
            if hidden is None:
                hidden = torch.zeros(B, T, h.shape[-1], dtype=h.dtype)
            hidden[b, :n] = h
    return FullBatch(ids, nxt, hidden, trained, lengths, B)


class FullSteps(torch.utils.data.Dataset):
    """Item i: step i of an epoch's batch plan as a FullBatch (built in DataLoader workers)."""

    def __init__(self, plan: list[list[TrainSequence]]):
        self.plan = plan
        self.masks, self.reader = MaskReader(), HiddenReader()  # per worker, opened lazily after the fork

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> FullBatch:
        return full_batch(self.plan[i], self.masks, self.reader)


def full_loader(plan: list[list[TrainSequence]], workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(FullSteps(plan), batch_size=None, shuffle=False, num_workers=workers,
                                       pin_memory=pin_memory, prefetch_factor=2 if workers else None)
