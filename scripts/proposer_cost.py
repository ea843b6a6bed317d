"""Host cost of the n-gram and union proposers per step, against context length (no base model needed).

    OMP_NUM_THREADS=1 python scripts/proposer_cost.py [--contexts 256,1024,4096] [--steps 400]

A synthetic context of natural-looking repetition (a 2k-token vocabulary drawn Zipf-like, with copied
spans) is grown step by step as the decode loop would: propose, feedback, accept. Prints the median
and 99th-percentile microseconds of one propose + feedback + accept at each context length.
"""

import argparse
import random
import statistics
import time

from ctc_drafter.decoding import DecodeState
from ctc_drafter.decoding.proposers import NgramProposer, UnionProposer


def synthetic_text(n: int, rng: random.Random) -> list[int]:
    out: list[int] = []
    while len(out) < n:
        if out and rng.random() < 0.3:  # copy an earlier span, as models quote their prompt and themselves
            a = rng.randrange(len(out))
            out += out[a: a + rng.randint(3, 12)]
        else:
            out.append(min(int(rng.paretovariate(1.1)), 2000))
    return out[:n]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="256,1024,4096")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--budget", type=int, default=16)
    a = ap.parse_args()
    rng = random.Random(0)
    print("| context tokens | proposer | median us/step | p99 us/step |\n|---|---|---|---|")
    for n in [int(x) for x in a.contexts.split(",")]:
        text = synthetic_text(n + a.steps * 4, rng)
        for name in ("ngram", "union of ngram + ngram"):
            p = NgramProposer() if name == "ngram" else UnionProposer([NgramProposer(), NgramProposer()])
            state = DecodeState(text[:n - 1], text[n - 1])
            p.start(state)
            times, pos = [], n
            for _ in range(a.steps):
                t0 = time.perf_counter()
                tree = p.propose(state, max_depth=10, budget=a.budget)
                emitted = text[pos: pos + 2]  # the base's next tokens
                p.feedback(tree, emitted)
                state.append(emitted, None)
                times.append((time.perf_counter() - t0) * 1e6)
                pos += 2
            times.sort()
            print(f"| {n} | {name} | {statistics.median(times):.0f} | {times[int(0.99 * len(times))]:.0f} |")


if __name__ == "__main__":
    main()
