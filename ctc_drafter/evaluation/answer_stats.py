"""Per-question numbers (tokens, wall time, verification steps, accepted lengths) and their sums over
questions (gamma, gamma_mean, beta, throughput); where two answers to a question first differ."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .token_counts import TokenCounter


@dataclass
class QuestionStats:
    tokens: int | None = 0  # None: some turn's count is unknown
    wall: float = 0.0
    steps: int | None = 0  # None: some turn has no idxs
    accept: list[int] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.wall if self.tokens is not None and self.wall > 0 else None


def question_stats(rec: dict, counter: TokenCounter, ours: bool, methods: Counter,
                   plain_loop: bool = False) -> QuestionStats:
    s = QuestionStats()
    step_offset = 0 if ours else 1  # reference idxs are the last 0-based loop index
    for c in rec["choices"]:
        walls, idxs, acc = c.get("wall_time") or [], c.get("idxs"), c.get("accept_lengths")
        for j in range(len(c["turns"])):
            n, how = counter.count(c, j, plain_loop)
            methods[how] += 1
            s.tokens = None if n is None or s.tokens is None else s.tokens + n
            s.wall += float(walls[j]) if j < len(walls) else 0.0
            has_step = isinstance(idxs, list) and j < len(idxs) and isinstance(idxs[j], (int, float))
            s.steps = s.steps + int(idxs[j]) + step_offset if has_step and s.steps is not None else None
            if isinstance(acc, list) and j < len(acc) and isinstance(acc[j], list):
                s.accept += [int(a) for a in acc[j]]
    return s


def acceptance_by_depth(hist: dict[int, int]) -> dict[int, float]:
    """P(a pass emits >= d + 1 tokens | it emitted >= d), for d = 1 .. the longest - 1, from the accepted-length
    histogram: how often the d-th draft token is accepted once the d - 1 before it were (the per-depth
    acceptance rate), which says at which depth a draft loses. Every recorded pass counts, the prefill and
    unspeculated steps too (they emit 1 token), so depth 1 reads a little low, and lower under the switch."""
    top = max((a for a, n in hist.items() if n), default=0)
    at_least = {d: sum(n for a, n in hist.items() if a >= d) for d in range(1, top + 1)}
    return {d: at_least[d + 1] / at_least[d] for d in range(1, top) if at_least[d]}


def _ratio(a, b):
    return a / b if a is not None and b else None


def summarize(spec: list[QuestionStats], base: list[QuestionStats]) -> dict:
    """gamma, gamma_mean, beta and throughput over paired per-question stats."""
    def tot(stats, key):
        vals = [getattr(s, key) for s in stats]
        return None if any(v is None for v in vals) else sum(vals)

    st, sw, ss = tot(spec, "tokens"), tot(spec, "wall"), tot(spec, "steps")
    bt, bw, bs = tot(base, "tokens"), tot(base, "wall"), tot(base, "steps")
    spec_tps, base_tps = _ratio(st, sw), _ratio(bt, bw)
    per_q = [_ratio(a.tokens_per_s, b.tokens_per_s) for a, b in zip(spec, base)]
    return {
        "n": len(spec),
        "gamma": _ratio(spec_tps, base_tps),
        "gamma_mean": None if not per_q or any(g is None for g in per_q) else sum(per_q) / len(per_q),
        "beta": _ratio(st, ss),
        "beta_baseline": _ratio(bt, bs),
        "spec_tokens_per_s": spec_tps,
        "baseline_tokens_per_s": base_tps,
        "spec_new_tokens": st,
        "baseline_new_tokens": bt,
        "spec_wall_s": sw,
        "baseline_wall_s": bw,
    }

def first_divergence(a: dict, b: dict) -> dict | None:
    """Where the answers of two records first differ: None if identical, else turn and token/char index."""
    for ci, (ca, cb) in enumerate(zip(a["choices"], b["choices"])):
        ta, tb = ca["turns"], cb["turns"]
        ia, ib = ca.get("tokens"), cb.get("tokens")
        for j in range(max(len(ta), len(tb))):
            if j >= len(ta) or j >= len(tb):
                return {"choice": ci, "turn": j, "by": "turns", "index": None}
            use_ids = (isinstance(ia, list) and isinstance(ib, list) and j < len(ia) and j < len(ib))
            xa, xb = (ia[j], ib[j]) if use_ids else (ta[j], tb[j])
            if xa != xb:
                k = next((k for k, (u, v) in enumerate(zip(xa, xb)) if u != v), min(len(xa), len(xb)))
                return {"choice": ci, "turn": j, "by": "token" if use_ids else "char", "index": k,
                        "spec": ta[j][:80] if use_ids else xa[max(0, k - 20):k + 40],
                        "baseline": tb[j][:80] if use_ids else xb[max(0, k - 20):k + 40]}
    return None


def by_token_ids(a: dict, b: dict) -> bool:
    return all(isinstance(c.get("tokens"), list) for c in a["choices"] + b["choices"])
