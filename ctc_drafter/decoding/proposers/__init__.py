"""Proposers: who suggests the draft tokens the base verifies (decoding/proposers/base.py)."""

from __future__ import annotations

from typing import Callable

import torch

from ...errors import CTCDrafterError
from .ar import ARProposer
from .base import Proposer
from .ctc import CTCProposer
from .frame_trees import MEDUSA_63, POLICIES, BeamTree, FrameTreePolicy, MedusaTree, PrefixTree, make_policy
from .ngram import NgramMemory, NgramProposer
from .union import UnionProposer

PROPOSERS = ("ctc", "ngram", "hybrid")
DEFAULT_PROPOSER = "hybrid"  # what from_pretrained and the CLI use: it accepts the most (BENCHMARKS.md)

# Node budgets (root included) when the user gives none. Tree size is nearly free on a GPU (one
# forward costs about the same for 1 or 256 tokens) but not on a CPU, where scripts/budget_sweep.py
# with the shipped draft gave the best tokens/s at 4-6 nodes (BENCHMARKS.md); 64 on CUDA is the
# paper's tree size. With a measured cost model the budget is only a ceiling: the hybrid sizes each
# step's tree itself.
DEFAULT_BUDGET = {"cpu": 4, "cuda": 64, "mps": 16}
SIZED_BUDGET = {"cpu": 16, "cuda": 64, "mps": 16}
# The draft's tree policy when the user names none. `prefix` accepts the most per node (BENCHMARKS.md),
# but its best-first search is host work that grows with the tree; on CUDA, where trees are 64
# nodes and a step is a few ms, the static `medusa` tree costs ~0.3 ms of host time whatever the size.
DEFAULT_GENERATOR = {"cuda": "medusa"}


def _kind(device) -> str:
    return device.type if isinstance(device, torch.device) else str(device).split(":")[0]


def default_generator(device, draft=None) -> str:
    if draft is not None and getattr(draft.config, "layout", None) == "eagle1":
        return "medusa"  # the reference layout decodes as its evaluation scripts do, on any device
    return DEFAULT_GENERATOR.get(_kind(device), "prefix")


def default_budget(device, proposer: str = "ctc", generator: str | None = None, sized: bool = False) -> int:
    kind = _kind(device)
    if proposer == "ctc" and (generator or default_generator(device)) == "medusa":
        return 64  # the paper's static tree is 63 paths: smaller budgets cut it
    return (SIZED_BUDGET if sized else DEFAULT_BUDGET).get(kind, 16)


def make_proposer(name: str, draft=None, generator: str | None = None,
                  cost_ms: Callable[[int], float] | None = None, memory: NgramMemory | None = None) -> Proposer:
    """'ctc' (the draft with tree policy `generator`; None: the device's default), 'ngram' (prompt lookup +
    memory, no draft needed), or 'hybrid' (both, merged by calibrated acceptance, sized by `cost_ms` when given)."""
    if generator is None:
        generator = default_generator(next(draft.parameters()).device if draft is not None else "cpu", draft)
    if name not in PROPOSERS:
        raise CTCDrafterError(f"unknown proposer {name!r} (use {', '.join(PROPOSERS)})")
    if generator not in POLICIES:
        raise CTCDrafterError(f"unknown tree policy {generator!r} (use {' or '.join(POLICIES)})")
    if name in ("ctc", "hybrid") and draft is None:
        raise CTCDrafterError(f"proposer {name!r} needs a draft model (or use --proposer ngram)")
    if name == "ctc":
        return draft_proposer(draft, generator)
    if name == "ngram":
        return NgramProposer(memory=memory)
    return UnionProposer([draft_proposer(draft, generator), NgramProposer(memory=memory)], cost_ms=cost_ms,
                         name="hybrid")


def draft_proposer(draft, generator: str = "beam") -> Proposer:
    """The proposer of a draft's architecture: frames from one state (nar) or levels (ar). The reference
    layout (eagle1) drafts every level, as `topK_genrate` does: no cut-off."""
    if getattr(draft.config, "layout", None) == "eagle1":
        return ARProposer(draft, generator, min_path_prob=0.0)
    ar = getattr(draft.config, "architecture", "nar") == "ar"
    return ARProposer(draft, generator) if ar else CTCProposer(draft, generator)


__all__ = ["Proposer", "CTCProposer", "ARProposer", "draft_proposer", "NgramProposer", "NgramMemory", "UnionProposer",
           "FrameTreePolicy", "MedusaTree", "BeamTree", "PrefixTree", "MEDUSA_63", "POLICIES", "PROPOSERS",
           "make_policy", "make_proposer", "default_budget", "default_generator", "DEFAULT_PROPOSER"]
