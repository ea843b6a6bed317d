"""Where a speculative step's time goes: the parts of `SpeculativeDecoder.generate`, timed by wrapping them.

    OMP_NUM_THREADS=1 python scripts/step_profile.py [--proposer ctc|ngram|hybrid] [--generator beam] \
        [--budget 4] [--threads 1] [--max-new-tokens 128] [--cpu-kernels packed|stock]

Prints ms per call of the whole step, the base forward (tree verification, or one token for vanilla),
the proposer (for the CTC draft: its context update, frames and tree policy), the tree's verify
inputs, acceptance and the KV compaction, and the host time the step spends outside the base pass;
then the same prompt without speculation. On a GPU the numbers include no synchronisation: use scripts/gpu_check.py there.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

PROMPT = "Write a short story about a robot who learns to paint. Make it vivid."


def wrap(timings, obj, name: str, key: str) -> None:
    f = getattr(obj, name)

    def timed(*a, **k):
        t = time.perf_counter()
        r = f(*a, **k)
        timings[key].append(time.perf_counter() - t)
        return r

    setattr(obj, name, timed)


def main():
    import ctc_drafter.decoding.generate as G
    from ctc_drafter.decoding.generate import CTCDrafter

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-model", default="default")
    ap.add_argument("--draft-model", default="default")
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--generator", default=None, help="CTC tree policy (default: the device's)")
    ap.add_argument("--proposer", default="hybrid", choices=["ctc", "ngram", "hybrid"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--cpu-kernels", default="auto", choices=["auto", "packed", "stock"])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    d = CTCDrafter.from_pretrained(a.base_model, a.draft_model, tree_policy=a.generator, budget=a.budget,
                                   cpu_kernels=a.cpu_kernels, proposer=a.proposer, adaptive=False)
    t = defaultdict(list)
    wrap(t, d, "speculative_step", "whole step")
    wrap(t, d.proposer, "propose", "propose")  # its catch-up on the accepted tokens included
    if d.draft is not None:
        wrap(t, d.draft, "frames", "  draft frames")
        wrap(t, d.draft, "extend", "  draft extend")
    for part in getattr(d.proposer, "parts", [d.proposer]):
        if hasattr(part, "policy"):
            wrap(t, part.policy, "build", f"  {part.policy.name} tree")
    wrap(t, d.base, "forward", "base forward")
    wrap(t, G.TokenTree, "verify_inputs", "verify inputs")
    wrap(t, G, "accept_greedy", "acceptance")
    wrap(t, G, "compact_kv", "KV compaction")
    d.chat(a.prompt, max_new_tokens=16)  # warm-up
    for spec in (True, False):
        t.clear()
        r = d.chat(a.prompt, max_new_tokens=a.max_new_tokens, speculative=spec)
        print(f"{'speculative' if spec else 'vanilla'}: {r.new_tokens} tokens, {r.steps} steps, beta "
              f"{r.mean_accept_length:.2f}, {r.tokens_per_s:.2f} tokens/s, {1000 * r.wall_s / r.steps:.1f} ms/step"
              + (f", {d.label()}" if spec else ""))
        for k, v in t.items():
            print(f"  {k:18s} {1000 * sum(v) / len(v):7.2f} ms x {len(v)}")
        if spec and t["whole step"]:
            host = (sum(t["whole step"]) - sum(t["base forward"][1:])) / len(t["whole step"])  # [0]: prefill
            print(f"  {'host outside base':18s} {1000 * host:7.2f} ms per step (proposer, tree, acceptance, cache)")


if __name__ == "__main__":
    main()
