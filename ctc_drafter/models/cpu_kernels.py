"""CPU linear-layer kernels for the base in our decoding loop: PyTorch's stock one, oneDNN packed, or
a per-call choice between them by row count.

Why: which kernel is fastest depends on the CPU and on the rows per call (1 for a vanilla step, the
node count for a tree pass). PyTorch's default fp32 CPU matmul (MKL) re-packs the weight on every
call, which makes a few rows far dearer than one; oneDNN's packed-weight kernel (the one
torch.compile's CPU backend uses) packs once at load. Which wins differs by CPU, dtype and rows
(BENCHMARKS.md, sections "CPU kernels: why a tree is affordable on this CPU" and "CPU kernels chosen by
measurement, per CPU"): `kernel_choice.py` measures and picks per size class; this file only runs them.

fp32: packed output differs from stock by float rounding (~1e-6 relative), like any change of matmul
kernel (MKL itself uses different kernels for 1 and 4 rows). bf16: both run oneDNN and agree bit for
bit (tests/test_cpu_kernels.py). The HF engines keep stock layers, so the benchmarks' token-for-token
agreement with HF `generate` measures this too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STOCK, PACKED = "stock", "packed"
PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def packed_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def packable(model: nn.Module) -> bool:
    """True for a CPU fp32/bf16 model on a PyTorch with oneDNN: the models these kernels apply to."""
    params = list(model.parameters())
    return (packed_linear_available() and bool(params)
            and all(p.device.type == "cpu" and p.dtype in PACKABLE_DTYPES for p in params))


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    """An inference-only nn.Linear whose weight lives in oneDNN's packed layout (CPU, fp32 or bf16)."""

    def __init__(self, linear: nn.Linear, keep_weight: bool = False, packed: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # A plain attribute, not a buffer: the packed layout is CPU-only and must not be moved or saved.
        self.packed = _pack(linear.weight) if packed is None else packed
        self.bias = linear.bias
        if keep_weight:  # the LM head: drafts read its rows (and it is tied to the embedding anyway)
            self.weight = linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _packed_linear(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN"


class KernelPlan:
    """Which kernel runs a call of `rows` rows; one instance is shared by every layer of a model.

    table: ascending (max_rows, kernel) classes; a call takes the first class with rows <= max_rows,
    calls larger than every class (a long prompt's prefill) take the last. `forced` overrides the
    table (used while timing each kernel).
    """

    def __init__(self, table: list[tuple[int, str]] | None = None):
        self.table = list(table or [(1, STOCK)])
        self.forced: str | None = None

    def kernel_for(self, rows: int) -> str:
        if self.forced is not None:
            return self.forced
        for max_rows, kernel in self.table:
            if rows <= max_rows:
                return kernel
        return self.table[-1][1]


class DispatchLinear(nn.Module):
    """nn.Linear that runs stock or packed weights per call, as the shared KernelPlan says for its rows."""

    def __init__(self, linear: nn.Linear, plan: KernelPlan):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.packed = _pack(linear.weight)  # plain attribute, as in PackedLinear
        self.plan = plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]  # x [..., in]: tokens in this call
        if self.plan.kernel_for(rows) == PACKED:
            return _packed_linear(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)

    def as_linear(self) -> nn.Linear:
        """The plain nn.Linear back (shares the weight tensor)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device="meta", dtype=self.weight.dtype)
        lin.weight, lin.bias = self.weight, self.bias
        return lin

    def as_packed(self, keep_weight: bool) -> PackedLinear:
        return PackedLinear(self, keep_weight=keep_weight, packed=self.packed)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, table={self.plan.table}"


def _swap_linears(model: nn.Module, make) -> int:
    """Replace every module m with type in make's domain by make(m, is_head); returns how many."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = make(child, child is head)
            if new is not None:
                setattr(parent, name, new)
                swapped += 1
    return swapped


def pack_linears(model: nn.Module) -> int:
    """Swap every nn.Linear of a CPU fp32/bf16 model for a PackedLinear; returns how many were swapped.

    Does nothing (returns 0) on other devices or dtypes, or where PyTorch lacks oneDNN.
    """
    if not packable(model):
        return 0
    return _swap_linears(model, lambda m, is_head: PackedLinear(m, keep_weight=is_head) if type(m) is nn.Linear else None)


def dispatch_linears(model: nn.Module, plan: KernelPlan) -> int:
    """Swap every nn.Linear of a packable model for a DispatchLinear following `plan` (both weights held)."""
    if not packable(model):
        return 0
    return _swap_linears(model, lambda m, is_head: DispatchLinear(m, plan) if type(m) is nn.Linear else None)


def settle_linears(model: nn.Module, plan: KernelPlan) -> int:
    """Once the plan is final: a plan of one kernel turns DispatchLinears into plain nn.Linear or
    PackedLinear (dropping the weight copy it no longer needs); a mixed plan keeps them."""
    kernels = {k for _, k in plan.table}
    if len(kernels) > 1:
        return 0

    def settle(m, is_head):
        if not isinstance(m, DispatchLinear):
            return None
        return m.as_packed(keep_weight=is_head) if kernels == {PACKED} else m.as_linear()

    return _swap_linears(model, settle)


def plan_label(table: list[tuple[int, str]]) -> str:
    """'stock', 'packed', or a mixed plan such as 'stock<=1,packed' (stock up to 1 row, packed above)."""
    kernels = [k for _, k in table] or [STOCK]
    if len(set(kernels)) == 1:
        return kernels[0]
    return ",".join([f"{k}<={n}" for n, k in table[:-1]] + [table[-1][1]])


def kernel_label(model: nn.Module) -> str:
    """The label of what the model's linear layers run now (plan_label's format)."""
    for m in model.modules():
        if isinstance(m, DispatchLinear):
            return plan_label(m.plan.table)
        if isinstance(m, PackedLinear):
            return PACKED
    return STOCK
