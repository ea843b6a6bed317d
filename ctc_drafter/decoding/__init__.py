"""Decoding: proposers and their token trees, verification, and the generate loops."""

from .generate import CTCDrafter, GenerationResult, SpeculativeDecoder
from .proposers import (BeamTree, CTCProposer, FrameTreePolicy, MedusaTree, NgramProposer, PrefixTree, Proposer,
                        SwitchModes, UnionProposer, default_budget, make_policy, make_proposer)
from .state import DecodeState
from .switch import SpeculationSwitch
from .tree import TokenTree, TreeError

__all__ = ["SpeculativeDecoder", "CTCDrafter", "GenerationResult", "DecodeState", "Proposer", "SwitchModes",
           "CTCProposer", "NgramProposer", "UnionProposer", "FrameTreePolicy", "BeamTree", "MedusaTree", "PrefixTree",
           "TokenTree", "TreeError", "SpeculationSwitch", "default_budget", "make_policy", "make_proposer"]
