"""Proposers: who suggests the draft tokens the base verifies (the interface and its contract:
decoding/proposers/base.py), by name: the registry below, or a plugin package.module:Class."""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Callable

import torch

from ...errors import CTCDrafterError
from .ar import ARProposer
from .base import Proposer, SwitchModes
from .ctc import CTCProposer, ctc_transform_for
from .frame_trees import MEDUSA_63, POLICIES, BeamTree, FrameTreePolicy, MedusaTree, PrefixTree, make_policy
from .ngram import NgramMemory, NgramProposer
from .union import UnionProposer

DEFAULT_PROPOSER = "hybrid"  # the engine's, from_pretrained's and the CLI's: it accepts the most (BENCHMARKS.md)

# Node budgets (root included) when the user gives none. A GPU pass costs about the same for 1 or
# 64 tokens, a CPU pass grows with the tree (the CPU value is scripts/budget_sweep.py's best,
# BENCHMARKS.md "The node budget"); 64 on CUDA is the paper's tree size; MPS's 16 is a guess, never
# measured. With a measured cost model the budget is only a ceiling: the hybrid sizes each step's tree.
DEFAULT_BUDGET = {"cpu": 4, "cuda": 64, "mps": 16}
SIZED_BUDGET = {"cpu": 16, "cuda": 64, "mps": 16}
# The draft's tree policy when the user names none. `prefix` accepts the most per node (BENCHMARKS.md),
# but its best-first search is host work that grows with the tree; on CUDA, where trees are 64 nodes
# and a step takes a few ms, the static `medusa` tree's host cost does not grow with its size.
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


@dataclass(frozen=True)
class ProposerKind:
    """A named proposer: factory(draft, policy, cost_ms, memory) -> Proposer."""

    factory: Callable[..., Proposer]
    takes_draft: bool  # from_pretrained loads the draft model for it
    needs_draft: bool  # none is built without a draft model (a --baseline run builds none)
    sized_by_cost: bool = False  # takes the measured pass cost (from_pretrained passes it)


REGISTRY: dict[str, ProposerKind] = {
    "ctc": ProposerKind(lambda draft, policy, cost_ms, memory: draft_proposer(draft, policy),
                        takes_draft=True, needs_draft=True),
    "ngram": ProposerKind(lambda draft, policy, cost_ms, memory: NgramProposer(memory=memory),
                          takes_draft=False, needs_draft=False),
    "hybrid": ProposerKind(lambda draft, policy, cost_ms, memory: UnionProposer(
        [draft_proposer(draft, policy), NgramProposer(memory=memory)], cost_ms=cost_ms, name="hybrid"),
        takes_draft=True, needs_draft=True, sized_by_cost=True),
}
PROPOSERS = tuple(REGISTRY)


def proposer_kind(name: str) -> ProposerKind:
    """A registered name, or 'package.module:Class' (a plugin: see proposers/base.py); CTCDrafterError else."""
    if name in REGISTRY:
        return REGISTRY[name]
    if not isinstance(name, str) or ":" not in name:
        raise CTCDrafterError(f"unknown proposer {name!r} (use {', '.join(REGISTRY)}, or package.module:Class)")
    cls = load_plugin(name)
    takes_draft = "draft" in inspect.signature(cls).parameters

    def factory(draft, policy, cost_ms, memory):
        try:
            proposer = cls(draft=draft) if takes_draft else cls()
        except TypeError as e:
            raise CTCDrafterError(f"proposer {name}: cannot construct it with "
                                  f"{'draft=' if takes_draft else 'no arguments'}: {e}") from e
        if proposer.name == Proposer.name:  # unnamed: answer files and logs name it by its spec
            proposer.name = name
        return proposer

    # draft=None where no draft is loaded (--baseline): the plugin decides what it does without one
    return ProposerKind(factory, takes_draft=takes_draft, needs_draft=False)


def load_plugin(spec: str) -> type[Proposer]:
    """'package.module:Class' -> the class, importable from sys.path (PYTHONPATH), a Proposer subclass."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CTCDrafterError(f"proposer plugin {spec!r}: write it as package.module:Class")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise CTCDrafterError(f"proposer plugin {spec}: no module named {e.name!r} on the Python path "
                                  "(set PYTHONPATH to the folder that holds it)") from None
        raise CTCDrafterError(f"proposer plugin {spec}: importing {module_name} failed: {e}") from e
    except Exception as e:  # noqa: BLE001 - the plugin's own import-time error, in one line
        raise CTCDrafterError(f"proposer plugin {spec}: importing {module_name} failed: "
                              f"{type(e).__name__}: {e}") from e
    cls = getattr(module, attr, None)
    if cls is None:
        raise CTCDrafterError(f"proposer plugin {spec}: module {module_name} has no {attr!r}")
    if not (isinstance(cls, type) and issubclass(cls, Proposer)):
        raise CTCDrafterError(f"proposer plugin {spec}: {attr} is not a subclass of "
                              "ctc_drafter.decoding.Proposer")
    return cls


def make_proposer(name: str, draft=None, generator: str | None = None,
                  cost_ms: Callable[[int], float] | None = None, memory: NgramMemory | None = None,
                  ctc_transform: bool | None = None) -> Proposer:
    """'ctc' (the draft with tree policy `generator`; None: the device's default), 'ngram' (prompt lookup +
    memory, no draft needed), 'hybrid' (both, merged by calibrated acceptance, sized by `cost_ms` when given),
    or a plugin 'package.module:Class'. ctc_transform: the draft's trees with the CTC rule or literally
    (proposers/ctc.py; None: as the draft was trained)."""
    kind = proposer_kind(name)
    if generator is None:
        generator = default_generator(next(draft.parameters()).device if draft is not None else "cpu", draft)
    if generator not in POLICIES:
        raise CTCDrafterError(f"unknown tree policy {generator!r} (use {' or '.join(POLICIES)})")
    if kind.needs_draft and draft is None:
        raise CTCDrafterError(f"proposer {name!r} needs a draft model (or use --proposer ngram)")
    policy = generator if draft is None or ctc_transform is None else make_policy(
        generator, ctc=ctc_transform_for(draft, ctc_transform))
    return kind.factory(draft, policy, cost_ms, memory)


def draft_proposer(draft, generator: str | FrameTreePolicy = "beam", ctc_transform: bool | None = None) -> Proposer:
    """The proposer of a draft's architecture: frames from one state (nar) or levels (ar). The reference
    layout (eagle1) drafts every level, as `topK_genrate` does: no cut-off."""
    if getattr(draft.config, "layout", None) == "eagle1":
        return ARProposer(draft, generator, min_path_prob=0.0, ctc_transform=ctc_transform)
    ar = getattr(draft.config, "architecture", "nar") == "ar"
    return (ARProposer(draft, generator, ctc_transform=ctc_transform) if ar
            else CTCProposer(draft, generator, ctc_transform))


__all__ = ["Proposer", "SwitchModes", "ProposerKind", "REGISTRY", "proposer_kind", "load_plugin", "CTCProposer",
           "ARProposer", "draft_proposer", "NgramProposer", "NgramMemory", "UnionProposer",
           "FrameTreePolicy", "MedusaTree", "BeamTree", "PrefixTree", "MEDUSA_63", "POLICIES", "PROPOSERS",
           "make_policy", "make_proposer", "default_budget", "default_generator", "DEFAULT_PROPOSER"]
