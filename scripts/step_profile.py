"""Where a speculative step's time goes: the parts of `CTCDrafter.generate`, timed by wrapping them.

    OMP_NUM_THREADS=1 python scripts/step_profile.py [--budget 4] [--threads 1] [--max-new-tokens 128] \
        [--cpu-kernels packed|stock]

Prints ms per call of the base forward (tree verification, or one token for vanilla), the draft's
frames and context update, the candidate tree and the KV compaction, then the same prompt without
speculation. On a GPU the numbers include no synchronisation: use scripts/gpu_check.py there.
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
    ap.add_argument("--generator", default="beam")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--cpu-kernels", default="packed", choices=["packed", "stock"])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    d = CTCDrafter.from_pretrained(a.base_model, a.draft_model, generator=a.generator, budget=a.budget,
                                   cpu_kernels=a.cpu_kernels)
    t = defaultdict(list)
    wrap(t, d.draft, "frames", "draft frames")
    wrap(t, d.draft, "extend", "draft extend")
    wrap(t, d.candidates, "build", "candidate tree")
    wrap(t, d.base, "forward", "base forward")
    wrap(t, G, "compact_kv", "KV compaction")
    d.chat(a.prompt, max_new_tokens=16)  # warm-up
    for spec in (True, False):
        t.clear()
        r = d.chat(a.prompt, max_new_tokens=a.max_new_tokens, speculative=spec)
        print(f"{'speculative' if spec else 'vanilla'}: {r.new_tokens} tokens, {r.steps} steps, beta "
              f"{r.mean_accept_length:.2f}, {r.tokens_per_s:.2f} tokens/s, {1000 * r.wall_s / r.steps:.1f} ms/step"
              + (f", budget {d.candidates.budget}" if spec else ""))
        for k, v in t.items():
            print(f"  {k:15s} {1000 * sum(v) / len(v):7.2f} ms x {len(v)}")


if __name__ == "__main__":
    main()
