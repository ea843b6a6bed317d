"""Tree attention that rounds exactly like the base's 1-token steps (lossless in bf16/fp16 on the CPU).

A tree pass hands every node the past plus all n tree keys, with the ones it must not see masked. In
exact arithmetic that is the 1-token step's attention; in bf16 it is not: the CPU's SDPA kernel rounds a
query row differently when the key length differs, even if the extra keys are masked out (measured:
165 of 200 random trials differ; BENCHMARKS.md, "bf16 on CPU"), and a flipped near-tie changes the
greedy output. So in a tree pass each node's attention is computed as the vanilla step computes it: one
query row, no mask, over exactly the keys it may see (the past and its ancestors, windowed for sliding
layers). Nodes that see equally many keys go in one batched call (each batch row is computed alone, so
batching does not change its rounding). The linear layers are made so by models/row_limit.py (a wide
pass runs them in blocks of the rows this CPU's kernels round row-invariantly).

Only tree passes take this path: the base's attention is registered as `EXACT_TREE_SDPA`, which is
plain SDPA unless `exact_tree_pass()` is active, so prefill, vanilla steps and HF `generate` on the same
model are untouched.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager

import torch

EXACT_TREE_SDPA = "ctc_drafter_exact_tree_sdpa"

_sdpa = None  # transformers' sdpa_attention_forward, bound by register() (not imported per attention call)

# During a tree pass: {id(mask): plan}, so each distinct mask (full / sliding) is read once per pass.
_PLANS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("ctc_drafter_tree_plans", default=None)


@contextmanager
def exact_tree_pass():
    """Within this block, multi-query attention calls with a 4D mask are computed node by node."""
    token = _PLANS.set({})
    try:
        yield
    finally:
        _PLANS.reset(token)


def _plan(mask: torch.Tensor) -> list[tuple[torch.Tensor | int, torch.Tensor | int]]:
    """Group the rows of an additive mask [1,1,n,L] by how many keys they see.

    Returns [(rows, keys)]: rows [g] that see c keys each and which ones, key indices [g,c]; or, for a
    single row that sees a contiguous prefix of the keys (a chain, a first-child path), the row and c
    as ints, so that its keys are a view, not a copy.
    """
    visible = mask[0, 0] == 0  # [n, L]
    counts = visible.sum(1).tolist()  # one host read per mask per pass
    prefix = visible.cumprod(1).sum(1).tolist()  # keys visible before the first hidden one
    groups: dict[int, list[int]] = {}
    for row, c in enumerate(counts):
        groups.setdefault(c, []).append(row)
    plan = []
    for c, rows in groups.items():
        if len(rows) == 1 and prefix[rows[0]] == c:
            plan.append((rows[0], c))
            continue
        rows_t = torch.tensor(rows, device=mask.device)
        plan.append((rows_t, visible[rows_t].nonzero()[:, 1].view(len(rows), c)))
    return plan


def exact_tree_sdpa(module, query, key, value, attention_mask, **kwargs):
    """transformers attention function: query [1,H,n,d], key/value [1,kvH,L,d] -> ([1,n,H,d], None)."""
    sdpa_attention_forward = _sdpa
    plans = _PLANS.get()
    n = query.shape[2]
    # A 1-node tree too: a masked 1-row call packs GQA heads differently from the vanilla step's unmasked one
    # (it changed SmolLM2's layer-3 keys in bf16), so every tree row goes through the plan.
    if plans is None or query.shape[0] != 1 or attention_mask is None or attention_mask.dim() != 4:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    plan = plans.get(id(attention_mask))
    if plan is None:
        plan = plans[id(attention_mask)] = _plan(attention_mask)
    out = query.new_empty(1, n, query.shape[1], value.shape[-1])
    for rows, idx in plan:
        if isinstance(idx, int):  # one row over the first idx keys
            o, _ = sdpa_attention_forward(module, query[:, :, rows:rows + 1], key[:, :, :idx], value[:, :, :idx],
                                          None, **kwargs)  # [1,1,H,d]
            out[0, rows] = o[0, 0]
            continue
        g, c = idx.shape
        k = key[0].index_select(1, idx.flatten()).unflatten(1, (g, c)).transpose(0, 1)  # [g,kvH,c,d]
        v = value[0].index_select(1, idx.flatten()).unflatten(1, (g, c)).transpose(0, 1)
        q = query[0].index_select(1, rows).transpose(0, 1).unsqueeze(2)  # [g,H,1,d]
        o, _ = sdpa_attention_forward(module, q, k, v, None, **kwargs)  # [g,1,H,d]
        out[0, rows] = o[:, 0]
    return out, None


def register() -> None:
    """Make EXACT_TREE_SDPA known to transformers (attention function, and SDPA's mask builder)."""
    global _sdpa
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    _sdpa = sdpa_attention_forward
    AttentionInterface.register(EXACT_TREE_SDPA, exact_tree_sdpa)
    AttentionMaskInterface.register(EXACT_TREE_SDPA, sdpa_mask)


def use_exact_tree_attention(model) -> bool:
    """Switch an SDPA base to EXACT_TREE_SDPA. Returns whether the base now uses it."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl == EXACT_TREE_SDPA:
        return True
    if impl != "sdpa":
        return False
    register()
    model.set_attn_implementation(EXACT_TREE_SDPA)
    return True
