"""Token trees: candidate continuations merged into a trie, and the tensors that verify it.

Node 0 is the root: the token the base model already chose (not yet in its KV cache). Every other
node is a draft token; parents come before children, siblings are ordered best first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from ..errors import CTCDrafterError


class TreeError(CTCDrafterError):
    """A malformed token tree (from a proposer): the message says which rule it breaks."""


@dataclass
class TokenTree:
    tokens: list[int]  # node -> token id (node 0 is the root)
    parents: list[int]  # node -> parent node (-1 for the root); a parent comes before its children
    # node -> the proposer's estimate that the base accepts the path to it (root 1.0); never rises along a path
    scores: list[float] = field(default_factory=list)
    depths: list[int] = field(default_factory=list, init=False)  # derived from parents
    children: list[list[int]] = field(default_factory=list, init=False)  # derived from parents
    derived_from: list[int] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self):
        if not self.scores:
            self.scores = [1.0] * len(self.tokens)
        self.derive()

    def derive(self) -> None:
        """Check the shape (TreeError) and compute depths and children from `parents`."""
        problem = shape_problem(self.tokens, self.parents, self.scores)
        if problem:
            raise TreeError(problem)
        self.derived_from = list(self.parents)
        self.depths = [0] * len(self.tokens)
        self.children = [[] for _ in self.tokens]
        for i in range(1, len(self.tokens)):
            self.depths[i] = self.depths[self.parents[i]] + 1
            self.children[self.parents[i]].append(i)

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def from_sequences(cls, root: int, scored: list[tuple[list[int], float]], budget: int,
                       max_depth: int | None = None) -> "TokenTree":
        """Merge scored token sequences (token list, log prob) into a trie and keep the `budget` best nodes.

        A node's score is the summed probability of the sequences through it, so a parent scores at
        least as high as its child and the kept set is prefix-closed; ties keep the shallower node.
        """
        score: dict[tuple[int, ...], float] = {}
        for seq, logp in scored:
            p = math.exp(logp)
            seq = tuple(seq[:max_depth] if max_depth is not None else seq)
            for d in range(1, len(seq) + 1):
                score[seq[:d]] = score.get(seq[:d], 0.0) + p
        return cls.from_prefix_scores(root, score, budget)

    @classmethod
    def from_prefix_scores(cls, root: int, score: dict[tuple[int, ...], float], budget: int) -> "TokenTree":
        """A trie of the `budget` - 1 best-scored prefixes (plus the root).

        Scores are first made monotone (a prefix scores at least as high as any extension: it is
        accepted whenever the extension is), so the best-first cut is always prefix-closed; a prefix
        whose own parent is missing from `score` is dropped.
        """
        mono: dict[tuple[int, ...], float] = {}
        for s in sorted(score, key=len):
            parent = mono.get(s[:-1], math.inf) if len(s) > 1 else math.inf
            if len(s) == 1 or s[:-1] in mono:
                mono[s] = min(score[s], parent)
        keep = sorted(mono, key=lambda s: (-mono[s], len(s), s))[: max(0, budget - 1)]
        keep.sort(key=lambda s: (len(s), -mono[s], s))  # parents first, best sibling first
        index = {(): 0}
        tokens, parents, scores = [root], [-1], [1.0]
        for s in keep:
            index[s] = len(tokens)
            tokens.append(s[-1])
            parents.append(index[s[:-1]])
            scores.append(mono[s])
        return cls(tokens, parents, scores=scores)

    def prefixes(self) -> list[tuple[int, ...]]:
        """node -> the draft tokens from the root's child down to it (() for the root)."""
        out: list[tuple[int, ...]] = [()]
        for i in range(1, len(self.tokens)):
            out.append(out[self.parents[i]] + (self.tokens[i],))
        return out

    def ancestor_mask(self) -> torch.Tensor:
        """[n, n] bool: row i is True on i and its ancestors (what node i may attend to)."""
        return _ancestor_mask(tuple(self.parents))

    def verify_inputs(self, past_len: int, device, dtype):
        """input_ids [1,n], position_ids [1,n], additive 4D mask [1,1,n,past+n] for one base pass.

        The tree's shape (depths and the n x n ancestor block) is built once per distinct shape and
        device and kept there (static trees repeat every step); per step only the token ids cross
        to the device, and the all-visible past block is made on the device.
        """
        n = len(self.tokens)
        ids = torch.tensor([self.tokens], device=device)
        depths, block = _shape_on_device(tuple(self.parents), torch.device(device), dtype)
        pos = (depths + past_len)[None]
        mask = torch.cat([torch.zeros(n, past_len, dtype=dtype, device=block.device), block], dim=1)
        return ids, pos, mask[None, None]

    def path_to(self, node: int) -> list[int]:
        """Nodes from the root to `node`, both included."""
        path = []
        while node != -1:
            path.append(node)
            node = self.parents[node]
        return path[::-1]


def shape_problem(tokens, parents, scores) -> str:
    """'' if the lists describe a tree (one root first, each parent before its children), else what is wrong."""
    n = len(tokens)
    if n == 0:
        return "the tree is empty (it needs at least the root)"
    if len(parents) != n or len(scores) != n:
        return f"tokens, parents and scores have different lengths ({n}, {len(parents)}, {len(scores)})"
    if parents[0] != -1:
        return f"node 0 is the root: its parent must be -1, not {parents[0]}"
    rest = parents[1:]
    if not rest or (set(map(type, rest)) == {int} and min(rest) >= 0 and all(map(int.__lt__, rest, range(1, n)))):
        return ""  # the common case, at C speed
    for i in range(1, n):
        p = parents[i]
        if type(p) is not int:
            return f"node {i}'s parent {p!r} is a {type(p).__name__}, not an int"
        if not 0 <= p < i:
            return (f"node {i}'s parent is {p}: each parent must be an earlier node (0..{i - 1}), "
                    "listed before its children")
    return ""


def check_tree(tree, root: int, budget: int, max_depth: int, vocab_size: int, who: str) -> None:
    """The proposer contract, checked on every tree before the base verifies it: TreeError naming `who`
    (the proposer) and the rule broken. Verification is lossless for any tree that passes. Host work
    only, linear in the nodes."""
    def refuse(rule: str):
        raise TreeError(f"proposer {who} broke the tree contract: {rule}")

    if not isinstance(tree, TokenTree):
        refuse(f"propose returned a {type(tree).__name__}, not a TokenTree")
    tokens, parents = tree.tokens, tree.parents
    problem = shape_problem(tokens, parents, tree.scores)
    if problem:
        refuse(problem)
    if tokens[0] != root:
        refuse(f"the tree is rooted at token {tokens[0]}, not at the newest token {root}")
    if len(tokens) > budget:
        refuse(f"{len(tokens)} nodes, over the budget of {budget} (root included)")
    if parents != tree.derived_from:  # the lists were changed after construction
        tree.derive()
    if max(tree.depths) > max_depth:
        refuse(f"depth {max(tree.depths)}, over the max_depth of {max_depth}")
    if min(tokens) < 0 or max(tokens) >= vocab_size:
        i, t = next((i, t) for i, t in enumerate(tokens) if not 0 <= t < vocab_size)
        refuse(f"node {i}'s token {t!r} is not an id of the base's vocabulary (0..{vocab_size - 1})")
    if len(set(zip(parents, tokens))) < len(tokens):
        seen = set()
        for i, key in enumerate(zip(parents, tokens)):
            if key in seen:
                refuse(f"node {i} repeats a sibling's token {key[1]} (siblings must differ)")
            seen.add(key)


@lru_cache(maxsize=512)
def _ancestor_mask(parents: tuple[int, ...]) -> torch.Tensor:
    n = len(parents)
    rows = [0] * n  # row i as a bit set: parents come first, so each row is its parent's plus itself
    for i in range(n):
        rows[i] = (rows[parents[i]] if i else 0) | (1 << i)
    return torch.tensor([[(r >> j) & 1 for j in range(n)] for r in rows], dtype=torch.bool)


@lru_cache(maxsize=512)
def _shape_on_device(parents: tuple[int, ...], device: torch.device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(depths [n] long, additive ancestor block [n,n]) of a tree shape, on `device`; cached per shape."""
    depths = [0] * len(parents)
    for i in range(1, len(parents)):
        depths[i] = depths[parents[i]] + 1
    block = torch.zeros(len(parents), len(parents), dtype=dtype)
    block.masked_fill_(~_ancestor_mask(parents), torch.finfo(dtype).min)
    return torch.tensor(depths, device=device), block.to(device)
