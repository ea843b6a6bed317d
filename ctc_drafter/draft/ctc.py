"""The CTC rule, CTC prefix beam search and best-prefix search over draft frames.

collapse: merge consecutive repeats, then drop blanks ("a a _ a b" -> "a a b").
prefix_beam_search: the N most probable *collapsed* sequences, each probability summed over all
frame alignments that collapse to it (not the single best path).
best_prefixes: the N prefixes most likely to start the collapsed output (exact prefix probability).
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict

import numpy as np
import torch

NEG_INF = float("-inf")


def collapse(symbols, blank: int) -> list[int]:
    out: list[int] = []
    prev = None
    for s in symbols:
        s = int(s)
        if s != prev and s != blank:
            out.append(s)
        prev = s
    return out


def _lae(a: float, b: float) -> float:
    if a == NEG_INF:
        return b
    if b == NEG_INF:
        return a
    m = max(a, b)
    return m + math.log(math.exp(a - m) + math.exp(b - m))


def prefix_beam_search(logprobs: torch.Tensor, blank: int, beam: int = 16, topk: int | None = 8,
                       ctc: bool = True) -> list[tuple[tuple[int, ...], float]]:
    """logprobs [L, S] (S symbols incl. blank) -> [(collapsed tokens, log prob)] best first.

    Each frame only expands its `topk` most probable non-blank symbols (None: all); with beam=inf and
    topk=None the result is exact: every collapsed sequence with its total probability.
    ctc=False treats the frames as Medusa-style heads: frame j is token j, no blank, no merging.
    """
    L, S = logprobs.shape
    # Candidate symbols per frame: one batched top-k where the frames live (GPU or CPU), then only
    # the [L, topk] winners and the blank column cross to the host.
    if topk is None:
        rows = logprobs.detach().double().cpu().tolist()
        cands = [[(c, p) for c, p in enumerate(row) if (c != blank or not ctc) and p > NEG_INF] for row in rows]
    else:
        masked = logprobs.detach()
        if ctc:
            masked = masked.clone()
            masked[:, blank] = NEG_INF
        vals, idx = masked.topk(min(topk, S - 1 if ctc else S), dim=-1)
        # one device-to-host copy (one sync on a GPU): ids, their log-probs and the blank column together
        # (float64 holds every token id exactly)
        host = torch.cat([idx.double(), vals.double(), logprobs[:, blank:blank + 1].detach().double()], 1).cpu()
        k = idx.shape[1]
        cands = [[(int(c), p) for c, p in zip(row[:k], row[k:2 * k]) if p > NEG_INF] for row in host.tolist()]
    blank_lp = (host[:, -1].tolist() if topk is not None else [r[blank] for r in rows]) if ctc else None
    # beams: prefix -> [log P(ending in blank), log P(ending in its last symbol)]
    beams: dict[tuple[int, ...], list[float]] = {(): [0.0, NEG_INF]}
    for t in range(L):
        cand = cands[t]
        nxt: dict[tuple[int, ...], list[float]] = defaultdict(lambda: [NEG_INF, NEG_INF])
        for prefix, (pb, pnb) in beams.items():
            total = _lae(pb, pnb)
            if ctc:
                e = nxt[prefix]
                e[0] = _lae(e[0], total + blank_lp[t])
            for c, p in cand:
                if ctc and prefix and prefix[-1] == c:
                    e = nxt[prefix]  # repeat without a blank between: merged into the same prefix
                    e[1] = _lae(e[1], pnb + p)
                    e2 = nxt[prefix + (c,)]  # a blank separated them: a new token
                    e2[1] = _lae(e2[1], pb + p)
                else:
                    e2 = nxt[prefix + (c,)]
                    e2[1] = _lae(e2[1], total + p)
        # Impossible prefixes (e.g. a repeat with no frame left for the blank) carry -inf: drop them.
        ranked = sorted(((k, v) for k, v in nxt.items() if _lae(*v) > NEG_INF), key=lambda kv: -_lae(*kv[1]))
        beams = dict(ranked[:beam]) if beam is not None else dict(ranked)
    out = [(p, _lae(*v)) for p, v in beams.items()]
    out.sort(key=lambda x: -x[1])
    return out


def best_prefixes(logprobs: torch.Tensor, blank: int, n: int, topk: int | None = 8, ctc: bool = True,
                  max_len: int | None = None) -> list[tuple[tuple[int, ...], float]]:
    """logprobs [L, S] -> the n collapsed prefixes g most likely to *start* the output, best first.

    Scored by the exact prefix probability P(collapse(frames) starts with g), summed over every
    alignment: the chance that the base accepts at least len(g) tokens of g if the draft is right.
    A tree of the top prefixes therefore maximises the draft's expected accepted length for its size
    (beam search ranks whole sequences instead, which splits a likely first token's mass over its many
    continuations). The score only falls along a path, so best-first search returns a prefix-closed
    set. Candidate symbols are the union of each frame's `topk` (None: all). ctc=False: frame j is
    token j (Medusa-style heads, no blank), the score a plain product.

    Vectorised over candidate symbols (numpy, float64): each chosen prefix scores all its one-symbol
    extensions with one [C, L] x [L] product, and the heap holds one extension per open prefix.
    """
    L, S = logprobs.shape
    lp = logprobs.detach()
    masked = lp.clone()
    if ctc:
        masked[:, blank] = NEG_INF
    k = S - (1 if ctc else 0) if topk is None else min(topk, S - (1 if ctc else 0))
    cands = sorted({c for row in masked.topk(k, dim=-1).indices.tolist() for c in row})
    # Only the candidate columns (and blank) leave the device: P[c, t] = P(frame t emits c).
    cols = cands + ([blank] if ctc else [])
    P = lp[:, cols].double().exp().cpu().numpy().T  # [C(+1), L]
    Pc = P[: len(cands)]
    Pb = P[-1] if ctc else None
    col_of = {c: i for i, c in enumerate(cands)}
    limit = min(L, max_len if max_len is not None else L)

    # State of a prefix h: gb[t], gn[t] = P(frames 1..t collapse to h, ending in blank / in h's last symbol).
    root_gb = np.concatenate([[1.0], np.cumprod(Pb)]) if ctc else np.zeros(L + 1)
    states = {(): (root_gb, np.zeros(L + 1))}
    scores: dict[tuple[int, ...], float] = {}

    def children(h) -> np.ndarray:
        """psi[c]: the prefix probability of h + (cands[c],)."""
        if not ctc:
            base = math.exp(scores[h]) if h else 1.0
            return base * Pc[:, len(h)]
        gb, gn = states[h]
        psi = Pc @ (gb[:-1] + gn[:-1])
        if h:  # a repeat of h's last symbol needs a blank between, or it merges into h
            r = col_of[h[-1]]
            psi[r] = Pc[r] @ gb[:-1]
        return psi

    def expand(g):
        h, c = g[:-1], g[-1]
        gb, gn = states[h]
        rep = bool(h) and h[-1] == c
        pc = Pc[col_of[c]]
        into = gb[:-1] + (0.0 if rep else gn[:-1])  # mass that may emit c at frame t
        cb, cn = np.zeros(L + 1), np.zeros(L + 1)
        for t in range(1, L + 1):
            cn[t] = pc[t - 1] * (cn[t - 1] + into[t - 1])
            cb[t] = Pb[t - 1] * (cb[t - 1] + cn[t - 1])
        states[g] = (cb, cn)

    # Lazy best-first: a prefix's extensions are sorted once; only its best not-yet-taken extension is
    # in the heap, and taking one puts its next sibling in. So two pushes per chosen prefix.
    ranked: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}

    def push_child(heap, h, rank):
        order, psi = ranked[h]
        if rank < len(order):
            i = order[rank]
            heapq.heappush(heap, (-float(psi[i]), h + (cands[i],), rank))

    def open_children(heap, h):
        if len(h) >= limit:
            return
        psi = children(h)
        order = np.argsort(-psi, kind="stable")
        ranked[h] = (order[psi[order] > 0], psi)
        push_child(heap, h, 0)

    heap: list = []
    open_children(heap, ())
    out = []
    while heap and len(out) < n:
        neg, g, rank = heapq.heappop(heap)
        scores[g] = math.log(-neg)
        out.append((g, scores[g]))
        push_child(heap, g[:-1], rank + 1)
        if ctc:
            expand(g)
        open_children(heap, g)
    return out
