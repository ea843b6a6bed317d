"""The base model's KV cache during speculation: how it is made, and how a verified tree is compacted.

A tree pass appends every node's keys/values; after acceptance only the past plus the accepted path
may stay, in path order, so the next pass sees exactly what a vanilla loop would have cached.

Every layer is a plain `DynamicLayer`, sliding-window layers included: row j then always holds
position j, which compaction and the tree mask rely on. transformers' `DynamicSlidingWindowLayer`
keeps only the last window - 1 rows and counts positions in its own `cumulative_length`, so rows
could not be dropped from its middle; the window is applied by the mask instead (models/attention.py),
at the price of keeping the whole context for those layers, as a full-attention layer does.
"""

from __future__ import annotations

import torch

from ..errors import CTCDrafterError


def new_kv_cache(base):
    """An empty cache for `base`; raises CTCDrafterError for a base whose attention a tree pass cannot verify."""
    from transformers import DynamicCache

    base.attention_layout  # noqa: B018 - validates the base's layer kinds once (cached)
    return DynamicCache()  # no config: DynamicLayer for every layer, created on first update


def compact_kv(cache, past_len: int, keep: list[int]) -> None:
    """Keep the first `past_len` rows of every layer plus tree nodes `keep` (ascending), drop the rest.

    In place and O(accepted): the kept nodes' rows are copied down to rows past_len.. (a node's row
    is never below its destination, as `keep` ascends from the root), then each layer is cut to a
    view of its first past_len + len(keep) rows.
    """
    from transformers.cache_utils import DynamicLayer

    n_keep = len(keep)
    moved = keep != list(range(n_keep))  # the accepted path is not already in place
    idx = None
    for layer in cache.layers:
        if type(layer) is not DynamicLayer:
            raise CTCDrafterError(f"cannot compact a {type(layer).__name__} cache layer; make the cache with "
                                  "new_kv_cache (plain DynamicLayers)")
        k, v = layer.keys, layer.values  # [B, H, past+n, hd]
        if moved:
            if idx is None or idx.device != k.device:
                idx = torch.tensor(keep, device=k.device) + past_len
            k[:, :, past_len: past_len + n_keep] = k.index_select(2, idx)
            v[:, :, past_len: past_len + n_keep] = v.index_select(2, idx)
        layer.keys, layer.values = k[:, :, : past_len + n_keep], v[:, :, : past_len + n_keep]
