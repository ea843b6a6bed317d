"""Is a linear layer's output row the same whatever the number of rows in the call? (CPU, per dtype)

    OMP_NUM_THREADS=1 python scripts/row_invariance.py [--dtype bfloat16] [--rows 2,4,8,16,32,33,48,64]

Speculation is exact in half precision only if a tree pass computes every node as the 1-token step
does. For each of SmolLM2-135M's linear shapes (in, out) and each row count M, prints how many of the
M rows of one `F.linear` call differ from the same row computed alone. Random weights and inputs,
fixed seed; PyTorch's own kernel (what `--cpu-kernels stock` runs).

The decoding loop measures the same thing on the model's own layers when a tree pass first needs it,
and runs wider passes' linear calls in blocks of that size (ctc_drafter/models/row_limit.py).
"""

from __future__ import annotations

import argparse

import torch

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]  # q/o, k/v, up/gate, down, lm_head


def differing_rows(in_f: int, out_f: int, m: int, dtype: torch.dtype, gen: torch.Generator) -> int:
    w = (torch.randn(out_f, in_f, generator=gen) * 0.05).to(dtype)
    x = torch.randn(m, in_f, generator=gen).to(dtype)
    alone = torch.cat([torch.nn.functional.linear(x[j:j + 1], w) for j in range(m)])
    return int((alone != torch.nn.functional.linear(x, w)).any(-1).sum())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--rows", default="2,4,8,16,24,32,33,48,64")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    rows = [int(r) for r in a.rows.split(",")]
    gen = torch.Generator().manual_seed(0)
    print(f"rows differing from the 1-row call ({a.dtype}, {torch.get_num_threads()} threads), per row count M")
    print("shape (in, out) | " + " | ".join(f"M={m}" for m in rows))
    for in_f, out_f in SHAPES:
        print(f"({in_f}, {out_f}) | " + " | ".join(str(differing_rows(in_f, out_f, m, dtype, gen)) for m in rows))


if __name__ == "__main__":
    main()
