"""How many nodes a step should verify: the size that maximises expected tokens per millisecond.

A tree's expected output is 1 (the base's bonus token) plus the sum, over draft nodes, of the
probability that the base accepts the path to the node (exactly one path is accepted, so
accepted length = number of accepted nodes). Nodes are taken best first; since a node never
scores above its parent, every best-first cut is a valid (prefix-closed) tree.
"""

from __future__ import annotations

from typing import Callable


def best_tree_size(probs: list[float], cost_ms: Callable[[int], float], max_nodes: int,
                   overhead_ms: float = 0.0) -> int:
    """probs: calibrated accept probabilities of the candidate draft nodes (root excluded).

    cost_ms(n): the verification pass's cost for n nodes (root included) on this machine. Returns
    the node count (root included, 1..max_nodes) with the most expected tokens per ms.
    """
    ranked = sorted(probs, reverse=True)[: max(0, max_nodes - 1)]
    best_n, best_rate, expected = 1, 1.0 / (cost_ms(1) + overhead_ms), 1.0
    for k, p in enumerate(ranked, start=2):
        expected += p
        rate = expected / (cost_ms(k) + overhead_ms)
        if rate > best_rate:
            best_n, best_rate = k, rate
    return best_n
