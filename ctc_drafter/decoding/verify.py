"""Accepting a verified tree: greedy matching and lossless speculative sampling.

Both acceptors walk the tree from the root and return (path of nodes, bonus token): the path's
tokens after the root are accepted draft tokens, and the bonus is the base model's own next token
after the last accepted node, so every step emits at least one token.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from transformers.generation.logits_process import (LogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)


MIN_TEMPERATURE = 1e-4  # logits / T must stay finite in float32 (1e-300 rounds to 0 there: inf / nan)


def check_sampling(temperature: float, top_k: int = 0, top_p: float = 1.0, greedy: bool = True) -> None:
    """The one check of sampling settings (decoding, HF baseline, distillation, make-prompts): temperature
    0 (greedy, where allowed) or finite >= MIN_TEMPERATURE, top_p in (0, 1], top_k >= 0. Raises
    CTCDrafterError naming the bad value."""
    from ..errors import CTCDrafterError

    if not ((greedy and temperature == 0) or MIN_TEMPERATURE <= temperature < math.inf):  # also refuses nan
        allowed = "0 (greedy) or " if greedy else ""
        raise CTCDrafterError(f"temperature must be {allowed}a finite value >= {MIN_TEMPERATURE:g}, got {temperature}")
    if not 0 < top_p <= 1:
        raise CTCDrafterError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise CTCDrafterError(f"top_k must be >= 0, got {top_k}")


@lru_cache(maxsize=8)
def sampling_warpers(temperature: float, top_k: int = 0, top_p: float = 1.0) -> tuple[LogitsProcessor, ...]:
    """transformers' own warpers, chosen and ordered as `generate(do_sample=True, num_beams=1)` does
    (GenerationMixin._get_logits_processor): temperature unless 1.0, then top-k unless 0, then top-p
    unless 1.0, each keeping at least one token. Sampling from their output is sampling as HF does."""
    warpers = []
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(float(temperature)))  # it refuses ints
    if top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=int(top_k)))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=float(top_p)))
    return tuple(warpers)  # cached: immutable


def warp_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [..., V] -> sampling distribution [..., V] (float32), as HF `generate` samples.

    HF warps float32 scores [batch, V] (top-p scatters along dim 1), so rows are flattened to [n, V]
    and every row is warped in one call.
    """
    rows = logits.float().reshape(-1, logits.shape[-1])  # [n, V]
    for warp in sampling_warpers(temperature, top_k, top_p):
        rows = warp(None, rows)  # these warpers do not read input_ids
    return rows.softmax(-1).reshape(logits.shape)


def accept_greedy(tree, logits: torch.Tensor) -> tuple[list[int], int]:
    """logits [n, V] at the tree's nodes. Follow children equal to the base argmax."""
    best = logits.argmax(-1).tolist()  # one device sync per step, not per node
    node = 0
    while True:
        nxt = next((c for c in tree.children[node] if tree.tokens[c] == best[node]), None)
        if nxt is None:
            return tree.path_to(node), best[node]
        node = nxt


def accept_sampling(tree, probs: torch.Tensor, generator: torch.Generator,
                    device_generator: torch.Generator | None = None) -> tuple[list[int], int]:
    """probs [n, V]: the base's (warped) distribution at every node, on its device.

    Recursive rejection sampling over siblings (SpecInfer/EAGLE) with deterministic proposals: child c
    is accepted with probability p(c); on rejection p(c) is zeroed and p renormalised before the next
    sibling; if all are rejected the bonus is drawn from what is left. Each emitted token is therefore
    distributed exactly as sampling the base model.

    Host work does not grow with the vocabulary or the node count: the probability each parent gives
    each child's token is gathered in one transfer, the walk runs on those scalars (uniforms from the
    host `generator`), and the bonus is drawn on the device (`device_generator`, default `generator`)
    from the last node's row with the rejected tokens zeroed: two host syncs per step.
    """
    n = len(tree)
    if n > 1:
        parents = torch.tensor(tree.parents[1:], device=probs.device)
        tokens = torch.tensor(tree.tokens[1:], device=probs.device)
        p_child = [0.0] + probs[parents, tokens].double().tolist()  # P_parent(child's token), node-indexed
    node = 0
    while True:
        left, rejected, moved = 1.0, [], False  # `left`: mass not yet rejected at this node
        for c in tree.children[node]:
            q = p_child[c] / left if left > 0 else 0.0
            if torch.rand((), generator=generator, dtype=torch.float64).item() < q:
                node, moved = c, True
                break
            rejected.append(tree.tokens[c])
            left -= p_child[c]
        if not moved:
            row = probs[node]
            if rejected:
                row = row.index_fill(0, torch.tensor(rejected, device=row.device), 0.0)
            bonus = int(torch.multinomial(row.float(), 1, generator=device_generator or generator).item())
            return tree.path_to(node), bonus
