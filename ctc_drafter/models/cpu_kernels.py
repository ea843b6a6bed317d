"""Faster fp32 linear layers for our decoding loop on CPU: oneDNN with weights packed once.

Why: PyTorch's default CPU matmul (MKL) is slow for inputs of a few rows, which is exactly what a
verification pass over a small token tree is, and on this project's AMD dev machine it is slow for a
single row too. Measured there (1 thread, all of SmolLM2-135M's linear layers, weights streamed from
memory): 1 row 45 -> 37 ms, 4 rows 61 -> 29 ms; a whole base pass over a 4-node tree 90 -> 50 ms
(`python scripts/tree_cost.py --kernels both`, BENCHMARKS.md). oneDNN's packed-weight kernel (the one
torch.compile's CPU backend uses) does not re-pack the weight on every call, where MKL loses its time.

The result differs from MKL's by float rounding only (~1e-6 relative), like any change of matmul
kernel (MKL itself uses different kernels for 1 and 4 rows). The HF engines keep stock layers, so the
benchmarks' token-for-token agreement with HF `generate` measures this too.
"""

from __future__ import annotations

import torch
from torch import nn


def packed_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedLinear(nn.Module):
    """An inference-only nn.Linear whose weight lives in oneDNN's packed layout (CPU, fp32)."""

    def __init__(self, linear: nn.Linear, keep_weight: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # A plain attribute, not a buffer: the packed layout is CPU-only and must not be moved or saved.
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.bias = linear.bias
        if keep_weight:  # the LM head: drafts read its rows (and it is tied to the embedding anyway)
            self.weight = linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN"


def pack_linears(model: nn.Module) -> int:
    """Swap every nn.Linear of a CPU fp32 model for a PackedLinear; returns how many were swapped.

    Does nothing (returns 0) on other devices or dtypes, or where PyTorch lacks oneDNN.
    """
    if not packed_linear_available():
        return 0
    params = list(model.parameters())
    if not params or any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
        return 0
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear(child, keep_weight=child is head))
                swapped += 1
    return swapped
