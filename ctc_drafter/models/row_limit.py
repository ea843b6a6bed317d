"""How many rows one linear call may take and still round every row as a 1-row call does, and a context
that splits wider calls into blocks of that many rows.

Why: speculation is exact in half precision only if a tree pass computes each node as the base's 1-token
step does. tree_attention.py makes the attention so; the linear layers usually are already, since a GEMM
computes each output row from its own input row. Not always: on an Intel Xeon with AMX, PyTorch's bf16
linear (oneDNN, stock and packed alike) rounds rows differently once a call has more than 32 rows
(scripts/row_invariance.py: 31-61 of 33-64 LM-head rows differ from the 1-row call), which made greedy
speculation diverge from the base at 64-node trees. Which sizes are safe depends on the CPU, the kernel,
the layer shapes and the thread count, so it is measured on the model's own layers, when a tree pass
first needs it (models/base.py), and wider tree passes run their linear calls in blocks of that size.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .cpu_kernels import DispatchLinear, PackedLinear

LINEAR_MODULES = (nn.Linear, PackedLinear, DispatchLinear)


def _linear_functions() -> tuple:
    """The calls a linear layer of ours ends in: PyTorch's (stock) and oneDNN's packed one."""
    packed = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    return (F.linear,) if packed is None else (F.linear, packed)


class _RowBlocks(TorchFunctionMode):
    """Runs every linear call of more than `limit` rows as consecutive calls of at most `limit` rows."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.functions = _linear_functions()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in self.functions:
            return func(*args, **kwargs)
        x, rest = args[0], args[1:]
        rows = x.numel() // x.shape[-1]
        if rows <= self.limit:
            return func(*args, **kwargs)
        flat = x.reshape(rows, x.shape[-1])  # [rows, in]
        out = torch.cat([func(flat[i:i + self.limit], *rest, **kwargs) for i in range(0, rows, self.limit)])
        return out.reshape(*x.shape[:-1], out.shape[-1])


@contextmanager
def linear_rows_at_most(limit: int):
    """Within this block, linear calls (stock or packed) take at most `limit` rows each."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    with _RowBlocks(limit):
        yield


def probe_sizes(up_to: int) -> list[int]:
    """Row counts to try, ascending: every size up to 8, then each multiple of 8 and its neighbours (where
    kernels change their blocking), and up_to itself."""
    sizes = set(range(2, min(up_to, 8) + 1)) | {up_to}
    for k in range(8, up_to + 2, 8):
        sizes |= {k - 1, k, k + 1}
    return sorted(s for s in sizes if 2 <= s <= up_to)


@torch.no_grad()
def row_invariant_rows(model: nn.Module, up_to: int, seed: int = 0) -> int:
    """The largest row count <= up_to at which every linear layer shape of `model` (as it runs now: stock,
    packed or dispatched, on this CPU and thread count) rounds each row exactly as a call of that row
    alone, for every probed size up to it. Random inputs; one layer per distinct shape and kind."""
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    layers = {}
    for m in model.modules():
        if isinstance(m, LINEAR_MODULES):
            layers.setdefault((type(m), m.in_features, m.out_features, m.bias is not None), m)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    limit = up_to
    for layer in layers.values():
        x = torch.randn(limit, layer.in_features, generator=gen).to(device=device, dtype=dtype)
        alone = torch.cat([layer(x[j:j + 1]) for j in range(limit)])  # [limit, out]
        good = 1
        for m in probe_sizes(limit):
            if not torch.equal(layer(x[:m]), alone[:m]):
                break
            good = m
        limit = good
        if limit == 1:
            break
    return limit
