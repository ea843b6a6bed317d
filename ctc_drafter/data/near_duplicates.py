"""Near-duplicate texts: character n-gram Jaccard similarity, found through MinHash banding (LSH).

Two texts are near-duplicates when the Jaccard similarity of their sets of character n-grams
(lower-cased, whitespace collapsed) reaches the threshold. Comparing every pair is quadratic, so
each text gets a MinHash signature; texts that agree on all rows of some band become candidates,
and only candidates get the exact Jaccard test. With 16 bands of 4 rows a pair at Jaccard 0.7 is a
candidate with probability 1 - (1 - 0.7^4)^16 = 0.99 (and a pair at 0.3 only 12 % of the time).
Hashes are CRC32 and a fixed seed, so the same texts give the same answer in every process.
"""

from __future__ import annotations

import re
import zlib

import numpy as np

_PRIME = (1 << 31) - 1  # the hash family (a*x + b) mod p: a, x mod p < 2^31, so a*x + b fits in uint64


def shingles(text: str, n: int = 5) -> set[int]:
    """The set of character n-grams of the normalised text, as CRC32 hashes."""
    t = re.sub(r"\s+", " ", text.lower()).strip()
    if len(t) <= n:
        return {zlib.crc32(t.encode())}
    return {zlib.crc32(t[i : i + n].encode()) for i in range(len(t) - n + 1)}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class NearDuplicateIndex:
    """The texts kept so far; `add` keeps a text unless it nearly duplicates one of them."""

    def __init__(self, threshold: float = 0.7, n: int = 5, bands: int = 16, rows: int = 4, seed: int = 0):
        self.threshold, self.n, self.bands, self.rows = threshold, n, bands, rows
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, _PRIME, bands * rows, dtype=np.uint64)
        self.b = rng.integers(0, _PRIME, bands * rows, dtype=np.uint64)
        self.sets: list[set[int]] = []
        self.buckets: dict[tuple, list[int]] = {}

    def signature(self, s: set[int]) -> np.ndarray:
        """[bands*rows] minimum of each hash function over the set."""
        x = np.fromiter(s, dtype=np.uint64, count=len(s)) % np.uint64(_PRIME)  # [n]
        return ((self.a[:, None] * x[None, :] + self.b[:, None]) % np.uint64(_PRIME)).min(axis=1)

    def find(self, text: str) -> int | None:
        """Index of a kept text this one nearly duplicates, or None."""
        s = shingles(text, self.n)
        for key in self._keys(self.signature(s)):
            for i in self.buckets.get(key, ()):
                if jaccard(s, self.sets[i]) >= self.threshold:
                    return i
        return None

    def add(self, text: str) -> int | None:
        """Keep `text` unless it nearly duplicates a kept one: None when kept, else that one's index."""
        dup = self.find(text)
        if dup is None:
            s = shingles(text, self.n)
            for key in self._keys(self.signature(s)):
                self.buckets.setdefault(key, []).append(len(self.sets))
            self.sets.append(s)
        return dup

    def _keys(self, sig: np.ndarray) -> list[tuple]:
        r = self.rows
        return [(band, *sig[band * r : (band + 1) * r]) for band in range(self.bands)]
