"""The draft's KV cache: keys/values of the accepted context only, preallocated.

The draft never sees speculative tokens, so its cache never rolls back. Storage grows by doubling,
so adding n accepted positions writes n rows in place (amortised O(n), not a copy of the whole
cache per step) and attention reads a view. The frame layer's buffer also serves as scratch for the
L speculative frame queries of one step: they are written just past the accepted length and
overwritten by the next accepted positions.
"""

from __future__ import annotations

import torch


class KVBuffer:
    """keys/values [B, H, capacity, hd], valid up to whatever length the caller tracks."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def write(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Put k, v [B,H,n,hd] at positions start..start+n-1; return views of positions 0..start+n-1."""
        end = start + k.shape[2]
        if self.k is None or self.k.shape[2] < end or self.k.shape[:2] != k.shape[:2] or self.k.dtype != k.dtype:
            self._grow(start, end, k, v)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def _grow(self, keep: int, end: int, k, v) -> None:
        B, H, _, hd = k.shape
        cap = max(64, 2 * end)
        nk = k.new_empty(B, H, cap, hd)
        nv = v.new_empty(B, H, cap, v.shape[-1])
        if self.k is not None and keep:
            nk[:, :, :keep] = self.k[:, :, :keep]
            nv[:, :, :keep] = self.v[:, :, :keep]
        self.k, self.v = nk, nv


class DraftCache:
    """layers[i]: the KVBuffer of context layer i; frame: the frame layer's keys over s_{<=t}; length: t+1."""

    def __init__(self):
        self.layers: list[KVBuffer] = []
        self.frame = KVBuffer()
        self.length = 0

    def layer(self, i: int) -> KVBuffer:
        while len(self.layers) <= i:
            self.layers.append(KVBuffer())
        return self.layers[i]
