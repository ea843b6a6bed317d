"""The CTC rule and CTC prefix beam search over draft frames.

collapse: merge consecutive repeats, then drop blanks ("a a _ a b" -> "a a b").
prefix_beam_search: the N most probable *collapsed* sequences, each probability summed over all
frame alignments that collapse to it (not the single best path).
"""

from __future__ import annotations

import math
from collections import defaultdict

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
        cands = [[(c, p) for c, p in zip(ci, pi) if p > NEG_INF]
                 for ci, pi in zip(idx.cpu().tolist(), vals.double().cpu().tolist())]
    blank_lp = logprobs[:, blank].detach().double().cpu().tolist() if ctc else None
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
