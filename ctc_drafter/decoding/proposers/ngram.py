"""The n-gram proposer: continuations of the context's longest earlier match (prompt lookup),
in this request and in earlier requests of the same process.

Models repeat their prompt and themselves (code edits, lists, quoted questions), and a process that
answers many similar requests (an eval run, a server) sees the same phrases again. An `NgramIndex`
maps every n-gram (n = 1..max_n) to the positions where it ends, kept incrementally as tokens
arrive, so a lookup costs O(max_n + continuations x depth) whatever the context length.

Scores: the continuations that follow the longest match form a trie; a node's conditional score is
the share of its parent's continuations that go through it, times n/(n+1) (a longer match is more
specific). The union proposer calibrates these against what the base accepts.
"""

from __future__ import annotations

from .base import Proposer, SwitchModes
from ..tree import TokenTree

SEPARATOR = -1  # between documents in the memory: no n-gram spans two requests


class NgramIndex:
    """Tokens plus, for each n-gram, the positions where it ends (the most recent `keep`)."""

    def __init__(self, max_n: int, keep: int = 8):
        self.max_n, self.keep = max_n, keep
        self.tokens: list[int] = []
        self.ends: dict[tuple[int, ...], list[int]] = {}

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens) -> None:
        toks, ends, keep = self.tokens, self.ends, self.keep
        for t in tokens:
            toks.append(int(t))
            i = len(toks) - 1
            for n in range(1, min(self.max_n, i + 1) + 1):
                gram = tuple(toks[i - n + 1: i + 1])
                if SEPARATOR in gram:
                    break  # longer grams would span it too
                lst = ends.get(gram)
                if lst is None:
                    ends[gram] = [i]
                else:
                    lst.append(i)
                    if len(lst) > keep:
                        del lst[0]

    def continuations(self, gram: tuple[int, ...], depth: int, limit: int, before: int | None = None) -> list[list[int]]:
        """Up to `limit` continuations (most recent match first) of length <= depth after `gram`,
        among matches ending before position `before` (None: anywhere)."""
        out = []
        for e in reversed(self.ends.get(gram, ())):
            if before is not None and e >= before:
                continue
            cont = self.tokens[e + 1: e + 1 + depth]
            if SEPARATOR in cont:
                cont = cont[: cont.index(SEPARATOR)]
            if cont:
                out.append(cont)
                if len(out) >= limit:
                    break
        return out


class NgramMemory:
    """Earlier requests' tokens (prompt + output) of this process, bounded to `max_tokens`."""

    def __init__(self, max_n: int = 4, max_tokens: int = 400_000, keep: int = 8):
        self.max_tokens = max_tokens
        self.index = NgramIndex(max_n, keep)
        self.documents = 0

    def clear(self) -> None:
        self.index = NgramIndex(self.index.max_n, self.index.keep)
        self.documents = 0

    def add(self, tokens: list[int]) -> None:
        if not tokens:
            return
        if len(self.index) + len(tokens) + 1 > self.max_tokens:
            # Keep the newer half: rebuilding is O(tokens) but happens once per max_tokens/2 added.
            old = self.index.tokens[len(self.index.tokens) // 2:]
            self.index = NgramIndex(self.index.max_n, self.index.keep)
            self.index.extend([SEPARATOR] + old)
        self.index.extend(list(tokens[-self.max_tokens // 2:]) + [SEPARATOR])
        self.documents += 1


class NgramProposer(Proposer, SwitchModes):
    """Prompt lookup with a tree of several continuations, plus a cross-request memory."""

    name = "ngram"
    cheap = True  # a dictionary lookup per step

    def __init__(self, max_n: int = 4, continuations: int = 8, memory: NgramMemory | None = None,
                 memory_min_n: int = 2):
        self.max_n, self.limit, self.memory_min_n = max_n, continuations, memory_min_n
        self.memory = memory if memory is not None else NgramMemory(max_n)
        self.index = NgramIndex(max_n)

    def start(self, state):
        if len(self.index):  # a request that ended without finish (an error): remembered all the same
            self.memory.add(self.index.tokens)
        self.index = NgramIndex(self.max_n)
        self.index.extend(state.read_tokens(self))

    def finish(self, state):
        self.index.extend(state.read_tokens(self))
        self.memory.add(self.index.tokens)  # the whole request, prompt and reply
        self.index = NgramIndex(self.max_n)

    def propose(self, state, max_depth, budget):
        self.index.extend(state.read_tokens(self))  # the tokens emitted since its last read
        conts, n = self.match(self.index.tokens, max_depth)
        if not conts:
            return TokenTree([state.root], [-1])
        return TokenTree.from_prefix_scores(state.root, continuation_scores(conts, n), budget)

    def match(self, context: list[int], depth: int) -> tuple[list[list[int]], int]:
        """Continuations after the longest suffix of `context` seen before (this request first, then
        the memory), and that suffix's length n."""
        here = len(context) - 1  # the suffix's own occurrence ends here: not a match
        for n in range(min(self.max_n, len(context)), 0, -1):
            gram = tuple(context[-n:])
            conts = self.index.continuations(gram, depth, self.limit, before=here)
            if n >= self.memory_min_n and len(conts) < self.limit:
                conts += self.memory.index.continuations(gram, depth, self.limit - len(conts))
            if conts:
                return conts, n
        return [], 0

    def forget(self):
        self.memory.clear()

    def describe(self):
        return {"proposer": self.name, "max_n": self.max_n}


def continuation_scores(conts: list[list[int]], n: int) -> dict[tuple[int, ...], float]:
    """Prefix -> path score: product over its tokens of (share of the parent's continuations) x n/(n+1)."""
    count: dict[tuple[int, ...], int] = {}
    for c in conts:
        for d in range(1, len(c) + 1):
            count[tuple(c[:d])] = count.get(tuple(c[:d]), 0) + 1
    trust = n / (n + 1)
    score: dict[tuple[int, ...], float] = {}
    for s in sorted(count, key=len):
        parent_count = count[s[:-1]] if len(s) > 1 else len(conts)
        score[s] = (score[s[:-1]] if len(s) > 1 else 1.0) * trust * count[s] / parent_count
    return score
