"""Base forward time against tree size: what the default node budget is chosen from.

    python scripts/tree_cost.py [--base-model default] [--device auto] [--past 256] [--reps 10] [--kernels both]

Times one base pass over n tree nodes (a chain; the mask shape, not its pattern, sets the cost) on top
of a `--past`-token KV cache, median of --reps after a warm-up, for n in 1..64. On CPU, --kernels
picks the linear layers: `packed` (oneDNN, what our decoding loop uses), `stock` (PyTorch's default,
what HF `generate` uses) or `both`.
"""

import argparse
import statistics
import time

import torch

from ctc_drafter.decoding.kv_cache import new_kv_cache
from ctc_drafter.decoding.tree import TokenTree
from ctc_drafter.decoding.kv_cache import compact_kv
from ctc_drafter.models import load_base_model
from ctc_drafter.models.cpu_kernels import pack_linears


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-model", default="default")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--past", type=int, default=256)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--sizes", default="1,2,4,8,12,16,24,32,48,64")
    ap.add_argument("--kernels", default="packed", choices=["packed", "stock", "both"])
    a = ap.parse_args()
    base = load_base_model(a.base_model, device=a.device)
    for kernels in (["stock", "packed"] if a.kernels == "both" else [a.kernels]):
        if kernels == "packed" and pack_linears(base.model) == 0:  # not a CPU fp32 model
            if a.kernels == "both":
                break
            kernels = "stock"
        time_sizes(base, a, kernels)


def time_sizes(base, a, kernels: str) -> None:
    cache = new_kv_cache(base)
    base.forward(torch.randint(0, 1000, (1, a.past), device=base.device), cache)
    sync = torch.cuda.synchronize if base.device.type == "cuda" else (lambda: None)
    print(f"{base.name} on {base.device} ({base.dtype}), torch threads {torch.get_num_threads()}, past {a.past}, "
          f"{kernels} linear layers")
    print(f"{'nodes':>5} {'ms':>8} {'ms/node':>8} {'vs 1 node':>9}")
    first = None
    for n in [int(x) for x in a.sizes.split(",")]:
        tree = TokenTree(list(range(100, 100 + n)), [-1] + list(range(n - 1)))
        ids, pos, mask = tree.verify_inputs(a.past, base.device, base.dtype)
        times = []
        for r in range(a.reps + 2):
            sync()
            t = time.perf_counter()
            base.forward(ids, cache, position_ids=pos, attention_mask=mask)
            sync()
            times.append(time.perf_counter() - t)
            compact_kv(cache, a.past, [])
        ms = statistics.median(times[2:]) * 1e3
        first = first or ms
        print(f"{n:>5} {ms:8.1f} {ms / n:8.2f} {ms / first:8.2f}x")


if __name__ == "__main__":
    main()
