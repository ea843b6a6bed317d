"""The base model's KV cache during speculation: how it is made, and how a verified tree is compacted.

A tree pass appends every node's keys/values; after acceptance only the past plus the accepted path
may stay, in path order, so the next pass sees exactly what a vanilla loop would have cached.
"""

from __future__ import annotations

import torch


def new_kv_cache(base):
    from transformers import DynamicCache

    return DynamicCache(config=base.config)


def compact_kv(cache, past_len: int, keep: list[int]) -> None:
    """Keep the first `past_len` entries of every layer plus tree nodes `keep` (in order), drop the rest.

    Written against the cache's layers directly because `DynamicCache.crop` changed meaning across
    transformers 5.x; every supported version stores per-layer `keys`/`values` [B, H, T, hd].
    """
    n_keep = len(keep)
    contiguous = keep == list(range(n_keep))
    idx = None
    for layer in cache.layers:
        k, v = layer.keys, layer.values
        if contiguous:
            layer.keys, layer.values = k[:, :, : past_len + n_keep], v[:, :, : past_len + n_keep]
            continue
        if idx is None or idx.device != k.device:
            idx = torch.tensor(keep, device=k.device) + past_len
        layer.keys = torch.cat([k[:, :, :past_len], k.index_select(2, idx)], 2)
        layer.values = torch.cat([v[:, :, :past_len], v.index_select(2, idx)], 2)
