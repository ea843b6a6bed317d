"""Rotary position embedding for the draft: the base's own class, so positions are encoded as the base does.

A draft borrows its base's embedding and LM head; it also borrows how the base encodes positions (rope
scaling such as Llama-3.1's `llama3`, yarn or dynamic NTK, partial rotary), built at `bind` from the
base's config.
"""

from __future__ import annotations

import copy
import functools
import inspect

import torch
from torch import nn

from .config import DraftConfig


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """x [B,n,T,hd]; cos, sin [B,1,T,r], r <= hd. Rotates the first r dimensions of each head and keeps
    the rest, as partial-rotary bases (Phi, GPT-NeoX) do; r == hd for most bases."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, keep = x[..., :r], x[..., r:]
    return torch.cat([rot * cos + rotate_half(rot) * sin, keep], dim=-1)


def base_rotary(lm, cfg: DraftConfig) -> nn.Module:
    """The base architecture's own rotary embedding class, built from the base's config for the draft's
    head size, so the draft encodes positions exactly as its base (rope scaling such as Llama-3.1's
    `llama3`, yarn or dynamic NTK included). Its forward(x, positions [B,T]) -> cos, sin [B,T,r].

    The class is the one the base's decoder holds as `rotary_emb` (as every HF rope decoder does); a
    fresh instance, so the base's own (dynamic) state is never shared. A base without rope (absolute
    positions, ALiBi) has none to share: the draft then uses plain rope with its config's rope_theta.
    """
    decoder = lm.get_decoder()
    base_rope = getattr(decoder, "rotary_emb", None)
    if isinstance(base_rope, nn.Module):
        config = copy.deepcopy(decoder.config)
        config.head_dim = cfg.head_dim  # the base's head size unless a draft config overrode it
        rotary = type(base_rope)(config)
    else:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        config = LlamaConfig(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                             head_dim=cfg.head_dim, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
        rotary = LlamaRotaryEmbedding(config)
    if "layer_type" in inspect.signature(rotary.forward).parameters:  # per-layer-type rope (e.g. Gemma 3)
        # the draft's layers attend to everything: the base's full-attention rope when it has one
        kind = "full_attention" if "full_attention" in rotary.layer_types else config.layer_types[-1]
        rotary.forward = functools.partial(rotary.forward, layer_type=kind)
    return rotary.to(lm.get_input_embeddings().weight.device)
