"""DraftConfig: the draft module's shape, derived from the base config, and which base it is for."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import CTCDrafterError, read_json_object


# Upper bounds far past any real model; a config beyond them is corrupt and would allocate absurdly.
_LIMITS = {"hidden_size": 65536, "vocab_size": 1 << 22, "num_attention_heads": 1024, "num_key_value_heads": 1024,
           "head_dim": 4096, "intermediate_size": 1 << 19, "num_context_layers": 64, "num_frames": 64,
           "label_len": 64}
ARCHITECTURES = ("nar", "ar")
# "standard": this project's layers (input norm, final norm, a learned blank head); "eagle1": the reference
# code's (draft/eagle1_model.py); "eagle3": EAGLE-3's, several base layers in (draft/eagle3_model.py).
# Configs without the field are "standard".
LAYOUTS = ("standard", "eagle1", "eagle3")
AR_DEFAULTS = {"num_frames": 4, "label_len": 3}  # levels drafted per step; tokens CTC aligns them to
_KINDS = {"int": int, "float": float, "str": str, "dict": dict, "list": list}
_KIND_NAMES = {int: "an integer", float: "a finite number", str: "a string", dict: "a JSON object", list: "a JSON list"}


@dataclass
class DraftConfig:
    hidden_size: int
    vocab_size: int  # base vocabulary
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    num_context_layers: int = 1  # causal layers over [h_t ; emb(x_{t+1})], incremental with a KV cache
    num_frames: int = 8  # L: frames the newest state expands into
    label_len: int = 6  # k: tokens x_{t+2}..x_{t+k+1} that CTC aligns the frames to in training
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    base_model: str = ""
    loss: str = "ctc"  # "ctc" (frames + blank) or "ce" (Medusa-style: frame j predicts token j, no blank)
    # Proposal vocabulary: 0 = every base token; N = the N tokens most frequent in the training targets
    # (ids in the weights as `vocab_ids`). Frames then score N tokens + blank: a 135M base's LM head
    # shrinks 6x at N = 8192, and a token outside the list can still be emitted by the base (lossless).
    draft_vocab: int = 0
    # "nar": L frames from one state (draft/model.py); "ar": the reference code's EAGLE-style head run
    # autoregressively for num_frames levels (draft/ar_model.py). Configs without it are "nar".
    architecture: str = "nar"
    layout: str = "standard"
    # eagle3 layout: the base layers whose inputs (the residual stream after layer i-1; 0 = the embeddings)
    # the draft reads, vLLM's `eagle_aux_hidden_state_layer_ids`. Empty for other layouts.
    aux_layers: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        """Token symbols a frame scores (the CTC blank comes after them, at index num_tokens)."""
        return self.draft_vocab or self.vocab_size

    @property
    def blank_id(self) -> int:
        return self.num_tokens

    @classmethod
    def from_base_config(cls, base_config, base_model: str = "", **overrides) -> "DraftConfig":
        c = base_config
        heads = int(c.num_attention_heads)
        head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // heads)
        rope = getattr(c, "rope_parameters", None) or {}
        theta = float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)) if isinstance(rope, dict)
                      else getattr(c, "rope_theta", 10000.0))
        kw = dict(
            hidden_size=int(c.hidden_size),
            vocab_size=int(c.vocab_size),
            num_attention_heads=heads,
            num_key_value_heads=int(getattr(c, "num_key_value_heads", None) or heads),
            head_dim=head_dim,
            intermediate_size=int(getattr(c, "intermediate_size", 4 * c.hidden_size)),
            rms_norm_eps=float(getattr(c, "rms_norm_eps", 1e-5)),
            rope_theta=theta,
            base_model=base_model,
        )
        if overrides.get("architecture") == "ar":  # the reference's 4 levels, a 3-token CTC window
            kw.update(AR_DEFAULTS)
        if overrides.get("layout") == "eagle3" and not overrides.get("aux_layers"):
            kw["aux_layers"] = default_aux_layers(int(c.num_hidden_layers))
        kw.update(overrides)
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Types, sizes and consistency: a config.json or --config from a user must fail here, in one
        line, not as a TypeError or an allocation of absurd size when the model is built."""
        self._check_types()
        for name in ("hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "intermediate_size", "num_context_layers", "num_frames", "label_len"):
            low, high = 1, _LIMITS[name]
            v = getattr(self, name)
            if not low <= v <= high:
                raise CTCDrafterError(f"draft config: {name} must be between {low} and {high}, got {v}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CTCDrafterError(f"draft config: num_attention_heads {self.num_attention_heads} is not a multiple of "
                                  f"num_key_value_heads {self.num_key_value_heads}")
        if not (self.rms_norm_eps > 0 and self.rope_theta > 0):
            raise CTCDrafterError("draft config: rms_norm_eps and rope_theta must be positive")
        if self.architecture not in ARCHITECTURES:
            raise CTCDrafterError(f"draft architecture must be {' or '.join(ARCHITECTURES)}, got {self.architecture!r}")
        if self.layout not in LAYOUTS:
            raise CTCDrafterError(f"draft layout must be {' or '.join(LAYOUTS)}, got {self.layout!r}")
        if self.layout == "eagle1" and (self.architecture != "ar" or self.draft_vocab):
            raise CTCDrafterError("the eagle1 layout drafts autoregressively over the whole vocabulary "
                                  "(architecture ar, draft_vocab 0)")
        if self.layout == "eagle3":
            if self.architecture != "ar" or self.num_context_layers != 1:
                raise CTCDrafterError("the eagle3 layout drafts autoregressively with one layer (architecture ar, "
                                      "num_context_layers 1)")
            if not self.aux_layers or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= 1024
                                               for i in self.aux_layers):
                raise CTCDrafterError(f"the eagle3 layout needs aux_layers, base layer ids >= 0, got {self.aux_layers}")
        elif self.aux_layers:
            raise CTCDrafterError("aux_layers belongs to the eagle3 layout")
        if self.loss not in ("ctc", "ce"):
            raise CTCDrafterError(f"draft loss must be ctc or ce, got {self.loss!r}")
        if self.num_frames < 1 or self.label_len < 1:
            raise CTCDrafterError("num_frames and label_len must be positive")
        if not 0 <= self.draft_vocab <= self.vocab_size:
            raise CTCDrafterError(f"draft_vocab must be between 0 (all tokens) and the vocabulary size "
                                  f"{self.vocab_size}, got {self.draft_vocab}")
        if self.loss == "ce" and self.label_len > self.num_frames:
            raise CTCDrafterError("with --loss ce, label_len must be <= num_frames (one frame per token)")

    def _check_types(self) -> None:
        self.check_field_types(self.to_dict())
        for f in fields(self):
            if f.type == "float":
                setattr(self, f.name, float(getattr(self, f.name)))

    @classmethod
    def check_field_types(cls, values: dict) -> None:
        """Each known field's JSON type (ints are not bools, floats are finite); unknown keys are ignored."""
        kinds = {f.name: _KINDS[f.type] for f in fields(cls)}
        for name, v in values.items():
            kind = kinds.get(name)
            if kind is None:
                continue
            ok = (isinstance(v, int) and not isinstance(v, bool) if kind is int
                  else isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) if kind is float
                  else isinstance(v, kind))
            if not ok:
                raise CTCDrafterError(f"draft config: {name} must be {_KIND_NAMES[kind]}, got {json.dumps(v)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["layout"] == "standard":  # written only when set: drafts (and resumable states) from before it match
            del d["layout"]
        if not d["aux_layers"]:
            del d["aux_layers"]
        return d

    def save(self, directory: Path) -> None:
        (Path(directory) / "config.json").write_text(json.dumps({"model_type": "ctc_draft", **self.to_dict()}, indent=2))

    @classmethod
    def load(cls, directory: Path) -> "DraftConfig":
        p = Path(directory) / "config.json"
        d = read_json_object(p, "draft config")
        if d.pop("model_type", None) != "ctc_draft":
            raise CTCDrafterError(f"{directory} is not a ctc-drafter draft (config.json has no model_type ctc_draft)")
        names = {f.name for f in fields(cls)}
        try:
            cfg = cls(**{k: v for k, v in d.items() if k in names})
        except TypeError as e:
            raise CTCDrafterError(f"draft config {p} is incomplete: {e}") from e
        try:
            cfg.validate()
        except CTCDrafterError as e:
            raise CTCDrafterError(f"{p}: {e}") from e
        return cfg


def default_aux_layers(num_layers: int) -> list[int]:
    """vLLM's default EAGLE-3 aux layers for a base of `num_layers` (SupportsEagle3's
    get_eagle3_default_aux_hidden_state_layers; llama.cpp's converter derives the same)."""
    ids = [2, num_layers // 2, num_layers - 3]
    if not all(0 <= i <= num_layers for i in ids):
        raise CTCDrafterError(f"a base of {num_layers} layers has no default EAGLE-3 aux layers {ids}; give "
                              "aux_layers in --config, e.g. '{\"aux_layers\": [0, 1, 2]}'")
    return ids
