"""Accepting a verified tree: greedy matching and lossless speculative sampling.

Both acceptors walk the tree from the root and return (path of nodes, bonus token): the path's
tokens after the root are accepted draft tokens, and the bonus is the base model's own next token
after the last accepted node, so every step emits at least one token.
"""

from __future__ import annotations

import torch


def warp_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [..., V] -> sampling distribution [..., V] (float32): temperature, then top-k, then top-p."""
    x = logits.float() / temperature
    if top_k and top_k < x.shape[-1]:
        kth = x.topk(top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        srt, idx = x.sort(dim=-1, descending=True)
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum - srt.softmax(-1) >= top_p  # keep the smallest prefix whose mass reaches top_p
        x = x.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
    return x.softmax(-1)


def accept_greedy(tree, logits: torch.Tensor) -> tuple[list[int], int]:
    """logits [n, V] at the tree's nodes. Follow children equal to the base argmax."""
    best = logits.argmax(-1).tolist()  # one device sync per step, not per node
    node = 0
    while True:
        nxt = next((c for c in tree.children[node] if tree.tokens[c] == best[node]), None)
        if nxt is None:
            return tree.path_to(node), best[node]
        node = nxt


def accept_sampling(tree, probs: torch.Tensor, generator: torch.Generator) -> tuple[list[int], int]:
    """probs [n, V]: the base's (warped) distribution at every node.

    Recursive rejection sampling over siblings (SpecInfer/EAGLE) with deterministic proposals: child c
    is accepted with probability p(c); on rejection p(c) is zeroed and p renormalised before the next
    sibling; if all are rejected the bonus is drawn from what is left. Each emitted token is therefore
    distributed exactly as sampling the base model.
    """
    node = 0
    p = probs[0].double().cpu()
    while True:
        moved = False
        for c in tree.children[node]:
            tok = tree.tokens[c]
            if torch.rand((), generator=generator, dtype=torch.float64).item() < p[tok].item():
                node, moved = c, True
                p = probs[c].double().cpu()
                break
            p[tok] = 0.0
            total = p.sum()
            if total <= 0:  # cannot happen with exact arithmetic: p(tok) == 1 is always accepted
                break
            p /= total
        if not moved:
            bonus = int(torch.multinomial(p.float(), 1, generator=generator).item())
            return tree.path_to(node), bonus
