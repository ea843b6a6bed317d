"""Our speculation and our vanilla loop at 1 and at 2 torch threads, interleaved in one process.

    python scripts/threads_ab.py [--rounds 3] [--max-new-tokens 128]

Loads the default drafter once (so the cost model and tree sizing are the same for every setting), then
for each round runs the demo's prompts speculatively and vanilla at each thread count, forgetting the
n-gram memory before every prompt. Prints the median tokens/s per setting: which thread count makes
the decode loop faster on this machine, beside what the kernel timing chose from base passes alone.
"""

import argparse
import statistics

import torch

from ctc_drafter.cli.demo import PROMPTS
from ctc_drafter.decoding import CTCDrafter


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    a = ap.parse_args()
    d = CTCDrafter.from_pretrained("default", "default", cpu_threads=2)
    d.chat("Hi", max_new_tokens=8)  # warm-up

    def run(threads: int, speculative: bool) -> float:
        torch.set_num_threads(threads)
        tokens = seconds = 0.0
        for p in PROMPTS:
            d.proposer.forget()
            r = d.chat(p, max_new_tokens=a.max_new_tokens, speculative=speculative)
            tokens, seconds = tokens + r.new_tokens, seconds + r.wall_s
        return tokens / seconds

    settings = [("speculative, 1 thread", 1, True), ("speculative, 2 threads", 2, True),
                ("vanilla, 1 thread", 1, False), ("vanilla, 2 threads", 2, False)]
    results = {name: [] for name, _, _ in settings}
    for _ in range(a.rounds):
        for name, threads, spec in settings:
            results[name].append(run(threads, spec))
    print(f"{d.base.name} ({str(d.base.dtype).removeprefix('torch.')}), kernels {d.kernels}")
    for name, v in results.items():
        print(f"{name:24s} tok/s median {statistics.median(v):.1f}  ({', '.join(f'{x:.1f}' for x in v)})")


if __name__ == "__main__":
    main()
