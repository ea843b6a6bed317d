"""Draft cost per speculative step: the AR draft's levels vs the NAR draft's frames, plus the tree policy.

    OMP_NUM_THREADS=1 python scripts/ar_draft_cost.py [--context 256] [--reps 30] [--rounds 3]

On the embedded default base (fp32, CPU): the NAR draft is the shipped one (8 frames, 8192-token
proposal vocabulary); the AR draft is untrained (seed 0), shaped for the same base with the same
proposal vocabulary and 4 levels (cost does not depend on the weights' values). Each step's draft work
is timed as the loop runs it: `accept` of 2 positions (extend), then frames/levels, then the policy's
tree under each budget. Rounds alternate the drafts; medians over all reps. One intra-op thread.
"""

import argparse
import statistics
import time

import torch

from ctc_drafter.decoding.proposers import make_policy
from ctc_drafter.draft import SHIPPED_DRAFT, CTCDraftModel, DraftCache, new_ar_draft_for
from ctc_drafter.models.base import load_base_model

POLICIES = [("medusa", 64), ("prefix", 4), ("prefix", 64), ("beam", 4), ("beam", 64)]


def ms(fn, reps):
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    base = load_base_model("default", device="cpu", dtype="float32")
    nar = CTCDraftModel.from_pretrained(SHIPPED_DRAFT).bind(base.model)
    ar = new_ar_draft_for(base, seed=0, draft_vocab=nar.config.draft_vocab).set_vocab(nar.vocab_ids)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8000, (1, a.context + 1), generator=g)
    with torch.no_grad():
        hidden, _ = base.forward(ids, None)
    times: dict[tuple, list[float]] = {}
    for _ in range(a.rounds):
        for name, draft in (("nar (8 frames)", nar), ("ar (4 levels)", ar)):
            cache = DraftCache()
            s = draft.extend(hidden[:, : a.context - 2], ids[:, 1: a.context - 1], cache)
            new_h, new_ids = hidden[:, a.context - 2: a.context], ids[:, a.context - 1: a.context + 1]
            step = lambda: draft.extend(new_h, new_ids, cache)  # noqa: E731
            for _ in range(a.reps):  # the accepted length must not drift: re-extend from the same point
                cache.length = a.context - 2
                times.setdefault((name, "accept 2 tokens (extend)"), []).extend(ms(step, 1))
            cache.length = a.context - 2
            s = step()
            rows = draft.frames(s, cache)
            times.setdefault((name, "frames / levels"), []).extend(ms(lambda: draft.frames(s, cache), a.reps))
            for pol, budget in POLICIES:
                p = make_policy(pol, ctc=True)
                f = lambda: p.build(1, rows[0], 10, budget, symbols=draft.symbol_tokens())  # noqa: E731
                times.setdefault((name, f"policy {pol} @ {budget}"), []).extend(ms(f, a.reps))
    print("| draft | part | median ms | p90 ms |\n|---|---|---|---|")
    for (name, part), t in times.items():
        t.sort()
        print(f"| {name} | {part} | {statistics.median(t):.2f} | {t[int(0.9 * len(t))]:.2f} |")


if __name__ == "__main__":
    main()
