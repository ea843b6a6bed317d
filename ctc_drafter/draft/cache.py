"""The draft's KV cache: keys/values of the accepted context only, preallocated.

The draft never sees speculative tokens, so its cache never rolls back. Storage grows by doubling,
so adding n accepted positions writes n rows in place (amortised O(n), not a copy of the whole
cache per step) and attention reads a view. The frame layer's buffer also serves as scratch for the
L speculative frame queries of one step: they are written just past the accepted length and
overwritten by the next accepted positions.
"""

from __future__ import annotations

from ..models.kv_cache import KVBuffer


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
