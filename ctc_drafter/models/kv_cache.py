"""KV caches in place: the storage both the base's and the draft's caches grow in (KVBuffer), the base
model's cache during speculation (how it is made), and how a verified tree is compacted.

A tree pass appends every node's keys/values; after acceptance only the past plus the accepted path
may stay, in path order, so the next pass sees exactly what a vanilla loop would have cached.

Every layer is a `GrowingLayer` (a `DynamicLayer` whose rows live in storage that doubles when full),
sliding-window layers included: row j then always holds position j, which compaction and the tree
mask rely on, and a pass writes only its own rows (DynamicLayer's torch.cat copies the whole cache
every pass, a cost that grows with the context: BENCHMARKS.md, section "The base's KV append").
transformers' `DynamicSlidingWindowLayer` keeps only the last window - 1 rows and counts positions in
its own `cumulative_length`, so rows could not be dropped from its middle; the window is applied by the
mask instead (models/attention.py), at the price of keeping the whole context for those layers, as a
full-attention layer does.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from ..errors import CTCDrafterError


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


class GrowingLayer(DynamicLayer):
    """keys/values are views of the first rows of a KVBuffer; a pass writes its rows in place.

    Compaction (`compact_kv`) leaves views of the same storage, so the next pass writes right after the
    kept rows. If anything else replaced keys/values (a crop, a reorder), the buffer is refilled from
    them first.
    """

    def _rows(self) -> int:
        return self.keys.shape[-2] if self.keys is not None and self.keys.dim() == 4 else 0

    def _buffer(self) -> KVBuffer:
        """The layer's buffer, refilled from keys/values first if they are not (any more) its views."""
        buf = self.__dict__.setdefault("_buf", KVBuffer())
        if self._rows() and (buf.k is None or self.keys.data_ptr() != buf.k.data_ptr()
                   or self.keys.stride() != buf.k.stride()):
            buf.write(0, self.keys, self.values)
        return buf

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:  # (lazy_initialization's signature differs between transformers 5.x)
            self.device, self.dtype, self.is_initialized = key_states.device, key_states.dtype, True
            self.keys = self.values = None
        self.keys, self.values = self._buffer().write(self._rows(), key_states, value_states)
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor, start: int = 0) -> None:
        """Keep batch rows `indices`, dropping the first `start` positions (left padding that no kept row
        attends to any more); the buffer keeps its spare capacity."""
        buf = self._buffer()
        n = self.keys.shape[-2] - start
        buf.k, buf.v = buf.k[indices, :, start:], buf.v[indices, :, start:]
        self.keys, self.values = buf.k[:, :, :n], buf.v[:, :, :n]


def new_kv_cache(base):
    """An empty cache for `base` (GrowingLayers, made on first update); raises CTCDrafterError for a base
    whose attention a tree pass cannot verify."""
    from transformers import DynamicCache

    if hasattr(base, "new_cache"):  # a base with its own cache storage (models/compiled_base.py)
        return base.new_cache()
    base.attention_layout  # noqa: B018 - validates the base's layer kinds once (cached)
    cache = DynamicCache()  # no config: one layer per model layer, created on first update
    cache.layer_class_to_replicate = GrowingLayer  # Cache's constructor field: the class it replicates
    return cache


def compact_kv(cache, past_len: int, keep: list[int]) -> None:
    """Keep the first `past_len` rows of every layer plus tree nodes `keep` (ascending), drop the rest.

    In place and O(accepted): the kept nodes' rows are copied down to rows past_len.. (a node's row
    is never below its destination, as `keep` ascends from the root), then each layer is cut to a
    view of its first past_len + len(keep) rows.
    """
    if hasattr(cache, "compact"):  # a cache that keeps its rows elsewhere (models/compiled_base.py StaticKV)
        cache.compact(past_len, keep)
        return
    plain = (DynamicLayer, GrowingLayer)
    n_keep = len(keep)
    moved = keep != list(range(n_keep))  # the accepted path is not already in place
    idx = None
    for layer in cache.layers:
        if type(layer) not in plain:
            raise CTCDrafterError(f"cannot compact a {type(layer).__name__} cache layer; make the cache with "
                                  "new_kv_cache (plain or growing DynamicLayers)")
        k, v = layer.keys, layer.values  # [B, H, past+n, hd]
        if moved:
            if idx is None or idx.device != k.device:
                idx = torch.tensor(keep, device=k.device) + past_len
            k[:, :, past_len: past_len + n_keep] = k.index_select(2, idx)
            v[:, :, past_len: past_len + n_keep] = v.index_select(2, idx)
        layer.keys, layer.values = k[:, :, : past_len + n_keep], v[:, :, : past_len + n_keep]
