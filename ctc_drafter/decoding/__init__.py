"""Decoding: proposers and their token trees, verification, and the generate loops."""

from .generate import CTCDrafter, GenerationResult
from .proposers import (BeamTree, CTCProposer, FrameTreePolicy, MedusaTree, NgramProposer, PrefixTree, Proposer,
                        UnionProposer, default_budget, make_policy, make_proposer)
from .tree import TokenTree

__all__ = ["CTCDrafter", "GenerationResult", "Proposer", "CTCProposer", "NgramProposer", "UnionProposer",
           "FrameTreePolicy", "BeamTree", "MedusaTree", "PrefixTree", "TokenTree", "default_budget",
           "make_policy", "make_proposer"]
