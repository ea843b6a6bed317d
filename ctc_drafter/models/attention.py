"""How the base attends, as far as tree verification cares: layer types, sliding window, back end.

A tree pass hands the base its own 4D additive mask (each node sees the past and its ancestors).
transformers uses such a mask as given, so everything the base would have added itself must be in
it: for sliding-window layers, the window. The speculative KV cache keeps every past token in every
layer (plain `DynamicLayer`s, see models/kv_cache.py), so cache row j holds position j and the
window is a condition on positions alone: query at q may see key at k iff q - window < k <= q
(transformers' `sliding_window_overlay`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import CTCDrafterError

log = logging.getLogger(__name__)

# Back ends that apply a custom additive 4D mask as given; flash/flex/paged ones ignore or reject it.
MASK_IMPLEMENTATIONS = ("sdpa", "eager")
FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class AttentionLayout:
    """The base's attention layers: which kinds, the sliding window, and how the model takes masks."""

    types: tuple[str, ...]  # per layer: FULL or SLIDING
    window: int | None  # tokens a sliding layer's query sees, itself included (None: no sliding layer)
    per_type_masks: bool  # the model indexes masks by layer type ({type: mask}) rather than taking one

    @property
    def sliding(self) -> bool:
        return self.window is not None


def attention_layout(config) -> AttentionLayout:
    """Read the layout from the layers transformers' own DynamicCache would build for `config`.

    Only full and sliding-window attention over a per-token KV cache can be verified as a tree;
    other layer kinds (chunked, linear/recurrent, KV shared between layers) are refused here.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    name = getattr(cfg, "model_type", "this")
    declared = getattr(cfg, "layer_types", None)
    if "chunked_attention" in (declared or ()) or getattr(cfg, "attention_chunk_size", None):
        raise CTCDrafterError(f"{name} base: chunked attention is not supported (tree verification needs "
                              "full or sliding-window attention)")
    types, windows = [], set()
    for i, layer in enumerate(DynamicCache(config=config).layers):
        if type(layer) is DynamicLayer:
            types.append(FULL)
        elif type(layer) is DynamicSlidingWindowLayer:
            types.append(SLIDING)
            windows.add(int(layer.sliding_window))
        else:
            raise CTCDrafterError(f"{name} base: attention layer {i} is a {type(layer).__name__}; tree verification "
                                  "supports only full and sliding-window attention")
    if len(windows) > 1:
        raise CTCDrafterError(f"{name} base: sliding windows differ between layers ({sorted(windows)}); not supported")
    mixed = len(set(types)) > 1
    if mixed and declared is None:
        raise CTCDrafterError(f"{name} base: mixes full and sliding layers without config.layer_types; not supported")
    return AttentionLayout(tuple(types), windows.pop() if windows else None, per_type_masks=mixed)


def layer_masks(mask: torch.Tensor, position_ids: torch.Tensor | None, layout: AttentionLayout):
    """The tree mask [1,1,n,past+n] as the model must receive it: itself when no layer slides; for
    sliding layers, also hiding keys at or beyond the window; a {layer type: mask} dict when mixed."""
    if not layout.sliding:
        return mask
    windowed = _apply_window(mask, position_ids, layout.window)
    if not layout.per_type_masks:
        return windowed
    return {FULL: mask, SLIDING: windowed}


def _apply_window(mask: torch.Tensor, position_ids: torch.Tensor | None, window: int) -> torch.Tensor:
    n, total = mask.shape[-2:]
    past = total - n
    device = mask.device
    q_pos = position_ids[0].to(device) if position_ids is not None else torch.arange(past, total, device=device)
    k_pos = torch.cat([torch.arange(past, device=device), q_pos])  # cache row j of the past is position j
    too_far = k_pos[None, :] <= q_pos[:, None] - window  # [n, past+n]
    return mask.masked_fill(too_far, torch.finfo(mask.dtype).min)


def ensure_mask_attention(model) -> None:
    """Switch a base whose attention back end would not honour the tree mask to sdpa (else eager)."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl in MASK_IMPLEMENTATIONS:
        return
    for choice in MASK_IMPLEMENTATIONS:
        try:
            model.set_attn_implementation(choice)
        except (ValueError, ImportError, NotImplementedError):
            continue
        log.warning("base model used attention %r, which ignores custom tree masks; switched to %r", impl, choice)
        return
    raise CTCDrafterError(f"the base model's attention {impl!r} cannot apply a tree mask, and it supports "
                          f"neither {' nor '.join(MASK_IMPLEMENTATIONS)}")
