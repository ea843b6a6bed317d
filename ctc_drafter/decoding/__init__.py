"""Decoding: candidate trees, verification, and the generate loops."""

from .candidates import (BeamCandidates, CandidateGenerator, MedusaTreeCandidates, default_budget,
                         make_generator)
from .generate import CTCDrafter, GenerationResult
from .tree import TokenTree

__all__ = ["CTCDrafter", "GenerationResult", "CandidateGenerator", "BeamCandidates", "MedusaTreeCandidates",
           "TokenTree", "default_budget", "make_generator"]
