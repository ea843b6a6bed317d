"""The CTC draft model, its config, the CTC rule, and how a draft is found for a base."""

from __future__ import annotations

import logging

from pathlib import Path

from ..errors import CTCDrafterError
from .config import DraftConfig
from .ctc import collapse, prefix_beam_search
from .ar_model import ARDraftModel, new_ar_draft_for
from .eagle1_model import Eagle1DraftModel, new_eagle1_draft_for
from .eagle3_model import Eagle3DraftModel, new_eagle3_draft_for
from .model import CTCDraftModel, DraftCache, new_draft_for

log = logging.getLogger(__name__)

UNTRAINED = {"untrained": new_draft_for, "untrained-ar": new_ar_draft_for, "untrained-eagle1": new_eagle1_draft_for}
SHIPPED_DRAFT = Path(__file__).resolve().parent.parent / "assets" / "default_draft"

__all__ = ["DraftConfig", "CTCDraftModel", "ARDraftModel", "Eagle1DraftModel", "Eagle3DraftModel", "DraftCache",
           "new_draft_for", "new_ar_draft_for", "new_eagle1_draft_for", "new_eagle3_draft_for",
           "draft_class", "load_draft_folder", "collapse", "prefix_beam_search", "load_draft", "SHIPPED_DRAFT"]


def draft_class(config: DraftConfig) -> type[CTCDraftModel]:
    """The model class of a config's architecture ("nar": frames from one state, "ar": levels) and layout
    ("eagle1": the reference code's, "eagle3": EAGLE-3's)."""
    if config.layout == "eagle1":
        return Eagle1DraftModel
    if config.layout == "eagle3":
        return Eagle3DraftModel
    return ARDraftModel if config.architecture == "ar" else CTCDraftModel


def load_draft_folder(directory, device="cpu", dtype=None) -> CTCDraftModel:
    """A saved draft of either architecture (its config.json says which), unbound."""
    import torch

    cls = draft_class(DraftConfig.load(Path(directory))) if Path(directory).is_dir() else CTCDraftModel
    return cls.from_pretrained(directory, device=device, dtype=dtype or torch.float32)


def load_draft(name_or_path: str, base, quiet: bool = False) -> tuple[CTCDraftModel, bool]:
    """Resolve --draft-model for `base` (a BaseModel). Returns (draft bound to base, trained?).

    'default': the draft shipped for the embedded default base (assets/default_draft; an untrained,
    deterministically initialised one if a checkout lacks its weights); 'untrained' / 'untrained-ar' /
    'untrained-eagle1': a fresh NAR / AR / reference-layout draft (seed 0) for any base; else a folder (any
    architecture).
    """
    from ..models.base import DEFAULT_NAME

    if name_or_path in ("default", *UNTRAINED):
        if name_or_path == "default" and base.name != DEFAULT_NAME:
            raise CTCDrafterError(
                f"--draft-model default is the draft for {DEFAULT_NAME}; base {base.name} needs a trained draft "
                "folder (ctc-drafter train), or 'untrained' for a random one")
        if name_or_path != "default" or not (SHIPPED_DRAFT / "model.safetensors").is_file():
            if not quiet:
                log.warning("using an UNTRAINED draft (deterministic init, seed 0); expect little or no speedup")
            return UNTRAINED.get(name_or_path, new_draft_for)(base, seed=0), False
        name_or_path = SHIPPED_DRAFT
    draft = load_draft_folder(name_or_path, device=base.device, dtype=base.dtype).bind(base.model)
    if draft.config.base_model and draft.config.base_model != base.name and not quiet:
        log.warning("draft was trained for %s, base is %s", draft.config.base_model, base.name)
    return draft, True
