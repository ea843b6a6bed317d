"""Base forward time against tree size: the cost curve the CPU kernel choice and node budget rest on.

    python scripts/tree_cost.py [--base-model default] [--device auto] [--dtype auto] [--past 256] [--reps 10]
                                [--kernels both] [--threads 1,2] [--sizes 1,2,4,8,...] [--tree-attention exact,masked]

Times one base pass over n tree nodes (a chain; the mask shape, not its pattern, sets the cost) on top
of a `--past`-token KV cache, the fastest of --reps after a warm-up, for each n in --sizes, with the same
procedure `--cpu-kernels auto` runs at first load (models/kernel_choice.py: measure_passes, kernels
and sizes interleaved). On CPU, --kernels picks the linear layers: `packed` (oneDNN packed weights),
`stock` (PyTorch's default, what HF `generate` uses) or `both`; --threads repeats it all per torch
thread count. Elsewhere (GPU) the stock layers are timed. --tree-attention: on the CPU tree passes attend
node by node so that they round like 1-token steps (`exact`, the default, models/tree_attention.py);
`masked` times one masked SDPA call per layer instead (what CUDA runs), for comparison.
"""

import argparse

import torch

from ctc_drafter.models import load_base_model
from ctc_drafter.models.cpu_kernels import KernelPlan, dispatch_linears
from ctc_drafter.models.kernel_choice import KERNELS, measure_passes, fastest


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-model", default="default")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--past", type=int, default=256)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--sizes", default="1,2,4,8,12,16,24,32,48,64")
    ap.add_argument("--kernels", default="both", choices=["packed", "stock", "both"])
    ap.add_argument("--threads", default=None, help="comma-separated torch thread counts (default: as set)")
    ap.add_argument("--tree-attention", default="exact", help="comma-separated: exact, masked")
    a = ap.parse_args()
    base = load_base_model(a.base_model, device=a.device, dtype=a.dtype)
    plan = KernelPlan()
    kernels = KERNELS if a.kernels == "both" else (a.kernels,)
    if dispatch_linears(base.model, plan) == 0:  # not a CPU fp32/bf16 model: only its own layers
        kernels = ("stock",)
    sizes = tuple(int(x) for x in a.sizes.split(","))
    exact = base.exact_tree
    for threads in [int(t) for t in a.threads.split(",")] if a.threads else [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        for mode in a.tree_attention.split(","):
            if mode not in ("exact", "masked"):
                ap.error(f"--tree-attention: {mode!r} is neither 'exact' nor 'masked'")
            base.exact_tree = exact and mode == "exact"
            timings = fastest(measure_passes(base, plan, sizes, kernels, reps=a.reps, past=a.past, budget_s=None))
            print_table(base, a, threads, timings, "exact" if base.exact_tree else "masked")


def print_table(base, a, threads: int, timings, attention: str) -> None:
    print(f"{base.name} on {base.device} ({str(base.dtype).replace('torch.', '')}), torch threads {threads}, "
          f"{attention} tree attention, past {a.past}, fastest of {a.reps}; "
          "ms per base pass (ms/node, x the 1-node pass of that kernel)")
    sizes = sorted(next(iter(timings.values())))
    print(f"{'nodes':>5} " + " ".join(f"{k:>22}" for k in timings) + "  fastest")
    for n in sizes:
        cells = [f"{t[n]:8.1f} {t[n] / n:6.2f} {t[n] / t[sizes[0]]:5.2f}x" for t in timings.values()]
        fastest = min(timings, key=lambda k: timings[k][n])
        print(f"{n:>5} " + " ".join(f"{c:>22}" for c in cells) + f"  {fastest}")
    print()


if __name__ == "__main__":
    main()
