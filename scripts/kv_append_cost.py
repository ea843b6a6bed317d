"""What appending a tree pass to the base's KV cache costs: transformers' DynamicLayer (torch.cat, a copy
of the whole cache every pass) against ours (`new_kv_cache`: rows written in place), then compaction.

    OMP_NUM_THREADS=1 python scripts/kv_append_cost.py [--contexts 256,1024,2048,4096] [--nodes 16]

Shapes of the embedded default base (SmolLM2-135M: 30 layers, 3 KV heads of 64) unless given; bf16.
Prints ms per step (update of every layer with --nodes rows, then keep 3 of them), median of --reps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def step_ms(make_cache, layers, heads, hd, ctx, nodes, reps, dtype) -> float:
    from ctc_drafter.models.kv_cache import compact_kv

    cache = make_cache()
    past = torch.randn(1, heads, ctx, hd).to(dtype)
    for i in range(layers):
        cache.update(past, past, i)
    new = torch.randn(1, heads, nodes, hd).to(dtype)
    times = []
    for _ in range(reps):
        length = cache.get_seq_length()
        t = time.perf_counter()
        for i in range(layers):
            cache.update(new, new, i)
        compact_kv(cache, length, [0, 1, 2])
        times.append((time.perf_counter() - t) * 1e3)
        compact_kv(cache, length, [])  # back to the same context for the next rep
    return statistics.median(times)


def main():
    from transformers import DynamicCache

    from ctc_drafter.models.kv_cache import new_kv_cache
    from ctc_drafter.models.cpu_info import cpu_identity

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="256,1024,2048,4096")
    ap.add_argument("--nodes", type=int, default=16)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=50)
    a = ap.parse_args()
    base = type("Base", (), {"attention_layout": None})()  # new_kv_cache only validates a real base
    print(f"CPU: {cpu_identity()['cpu']}, torch threads {torch.get_num_threads()}, bf16, {a.layers} layers x "
          f"{a.kv_heads} KV heads x {a.head_dim}, {a.nodes}-node pass then keep 3")
    print("| context | DynamicLayer (cat) ms/step | new_kv_cache (in place) ms/step |")
    print("|---|---|---|")
    for ctx in map(int, a.contexts.split(",")):
        cat = step_ms(DynamicCache, a.layers, a.kv_heads, a.head_dim, ctx, a.nodes, a.reps, torch.bfloat16)
        ours = step_ms(lambda: new_kv_cache(base), a.layers, a.kv_heads, a.head_dim, ctx, a.nodes, a.reps,
                       torch.bfloat16)
        print(f"| {ctx} | {cat:.3f} | {ours:.3f} |")


if __name__ == "__main__":
    main()
