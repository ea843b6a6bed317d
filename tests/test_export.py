"""`ctc-drafter export --format eagle`: the EAGLE-1 checkpoint vLLM's llama_eagle.py loads, for drafts of the
eagle1 layout (draft/export.py); every other layout refused in one line."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from conftest import tiny_llama
from ctc_drafter.cli.main import main as cli_main
from ctc_drafter.draft import (DraftConfig, Eagle1DraftModel, load_draft_folder, new_ar_draft_for, new_draft_for,
                               new_eagle1_draft_for)
from ctc_drafter.draft.export import import_eagle
from ctc_drafter.models.base import BaseModel

LAYERS = 2  # layer 0 without its input norm, layer 1 with one: both kinds of layer in the checkpoint


@pytest.fixture
def toy(tmp_path):
    """(base, its HF folder, a saved eagle1 draft with a non-zero fc bias, that draft's folder)."""
    lm = tiny_llama(seed=3)
    lm.config.rope_parameters = {"rope_type": "default", "rope_theta": 31000.0}  # not the default: must be copied
    base = BaseModel(lm, None, "toy")
    base_dir = tmp_path / "base"
    lm.save_pretrained(base_dir)
    draft = new_eagle1_draft_for(base, seed=1, num_context_layers=LAYERS)
    with torch.no_grad():
        draft.fuse.bias.copy_(torch.randn(draft.fuse.bias.shape, generator=torch.Generator().manual_seed(5)))
    draft_dir = tmp_path / "draft"
    draft.save_pretrained(draft_dir)
    return base, base_dir, draft, draft_dir


def export(draft_dir, out, base_dir, *extra):
    return cli_main(["export", "--format", "eagle", str(draft_dir), str(out), "--base-model", str(base_dir), *extra])


def expected_keys(cfg: DraftConfig) -> dict[str, tuple]:
    """What vLLM's EagleLlamaForCausalLM holds from a checkpoint (llama_eagle.py): fc without a bias, Llama decoder
    layers with attention biases (fc's, folded in), layer 0 without input_layernorm; no embedding, norm or head."""
    d, hd, nh, nkv, m = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, \
        cfg.intermediate_size
    keys = {"fc.weight": (d, 2 * d)}
    for i in range(cfg.num_context_layers):
        p = f"layers.{i}."
        keys.update({p + "self_attn.q_proj.weight": (nh * hd, d), p + "self_attn.q_proj.bias": (nh * hd,),
                     p + "self_attn.k_proj.weight": (nkv * hd, d), p + "self_attn.k_proj.bias": (nkv * hd,),
                     p + "self_attn.v_proj.weight": (nkv * hd, d), p + "self_attn.v_proj.bias": (nkv * hd,),
                     p + "self_attn.o_proj.weight": (d, nh * hd), p + "self_attn.o_proj.bias": (d,),
                     p + "post_attention_layernorm.weight": (d,), p + "mlp.gate_proj.weight": (m, d),
                     p + "mlp.up_proj.weight": (m, d), p + "mlp.down_proj.weight": (d, m)})
        if i:
            keys[p + "input_layernorm.weight"] = (d,)
    return keys


def test_keys_shapes_and_config_are_what_vllms_eagle1_loader_reads(toy, tmp_path):
    base, base_dir, draft, draft_dir = toy
    assert export(draft_dir, tmp_path / "out", base_dir) == 0
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected_keys(draft.config)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    c = draft.config
    assert cfg["architectures"] == ["EagleLlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["head_dim"], cfg["vocab_size"], cfg["attention_bias"]) == \
        (LAYERS, c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
         c.vocab_size, True)
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 31000.0}
    assert cfg["max_position_embeddings"] == base.config.max_position_embeddings
    # the layer names are transformers' Llama names (the ones vLLM's loader maps onto its fused weights)
    layer = LlamaDecoderLayer(LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"}), 1)
    assert {f"layers.1.{k}" for k in layer.state_dict()} == {k for k in tensors if k.startswith("layers.1.")}


def eagle1_as_vllm_computes(tensors, cfg: dict, embed, head, hidden, ids):
    """vLLM's EagleLlamaModel.forward, written with transformers' Llama layer over the exported tensors:
    fc(cat(embed, hidden)) -> layers (layer 0's input_layernorm an Identity) -> no final norm -> head."""
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"})
    config._attn_implementation = "eager"
    T = ids.shape[1]
    x = torch.nn.functional.linear(torch.cat([embed(ids), hidden], -1), tensors["fc.weight"])
    pos = torch.arange(T)[None]
    cos_sin = LlamaRotaryEmbedding(config)(x, pos)
    mask = torch.full((T, T), float("-inf"), dtype=x.dtype).triu(1)[None, None]
    for i in range(cfg["num_hidden_layers"]):
        layer = LlamaDecoderLayer(config, i).to(x.dtype)
        if i == 0:
            layer.input_layernorm = torch.nn.Identity()
        layer.load_state_dict({k.removeprefix(f"layers.{i}."): v for k, v in tensors.items()
                               if k.startswith(f"layers.{i}.")})
        x = layer(x, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
    return head(x)


def test_the_checkpoint_computes_our_draft_in_vllms_eagle1_forward(toy, tmp_path):
    """fc's column order (embedding first), the folded fc bias, the layer names and the copied rope, checked
    by computing: the forward of llama_eagle.py over the exported tensors equals our draft's logits."""
    base, base_dir, draft, draft_dir = toy
    assert export(draft_dir, tmp_path / "out", base_dir) == 0
    tensors = {k: v.double() for k, v in load_file(str(tmp_path / "out" / "model.safetensors")).items()}
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    g = torch.Generator().manual_seed(0)
    hidden, ids = torch.randn(1, 9, draft.config.hidden_size, generator=g, dtype=torch.float64), \
        torch.randint(0, draft.config.vocab_size, (1, 9), generator=g)
    lm = base.model
    theirs = eagle1_as_vllm_computes(tensors, cfg, lm.get_input_embeddings(), lm.get_output_embeddings(), hidden, ids)
    ours = draft(hidden, ids).logits
    # transformers' (and vLLM's) RMSNorm computes in float32, ours in the input's float64: rounding apart only
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)
    assert theirs.argmax(-1).tolist() == ours.argmax(-1).tolist()


def test_round_trip_gives_back_the_same_weights_and_logits(toy, tmp_path):
    base, base_dir, draft, draft_dir = toy
    assert export(draft_dir, tmp_path / "out", base_dir) == 0
    back = Eagle1DraftModel(draft.config)
    back.load_state_dict(import_eagle(load_file(str(tmp_path / "out" / "model.safetensors")), draft.config))
    back = back.to(torch.float64).bind(base.model)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in draft.state_dict().items())
    hidden = torch.randn(2, 7, draft.config.hidden_size, dtype=torch.float64)
    ids = torch.randint(0, draft.config.vocab_size, (2, 7))
    assert torch.equal(back(hidden, ids).logits, draft(hidden, ids).logits)


def _saved(draft, folder):
    draft.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind, fmt, reason", [
    ("ar", "eagle", "the standard AR layout has layer 0's input norm, a final norm and a reduced 16-token head"),
    ("nar", "eagle", "a non-autoregressive draft"),
    ("eagle1", "eagle3", "a draft of the eagle1 layout reads the last state alone: train with --layout eagle3"),
])
def test_drafts_that_cannot_map_exactly_are_refused_in_one_line(toy, tmp_path, capsys, kind, fmt, reason):
    base, base_dir, eagle1, draft_dir = toy
    if kind == "ar":
        draft_dir = _saved(new_ar_draft_for(base, draft_vocab=16), tmp_path / "ar")
    elif kind == "nar":
        draft_dir = _saved(new_draft_for(base), tmp_path / "nar")
    capsys.readouterr()
    code = cli_main(["export", "--format", fmt, str(draft_dir), str(tmp_path / "out"), "--base-model", str(base_dir)])
    err = capsys.readouterr().err
    assert code != 0 and len(err.strip().splitlines()) == 1 and reason in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_base_of_another_size_is_refused(toy, tmp_path, capsys):
    _, _, _, draft_dir = toy
    other = tmp_path / "other"
    tiny_llama(hidden=48).save_pretrained(other)
    capsys.readouterr()
    assert export(draft_dir, tmp_path / "out", other) != 0
    assert "hidden size 32" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_base_whose_embedding_or_head_is_not_plain_is_refused(toy, tmp_path, capsys):
    from conftest import tiny_arch

    _, _, _, draft_dir = toy
    gemma = tmp_path / "gemma2"
    tiny_arch("gemma2").save_pretrained(gemma)  # a scaled embedding and a soft-capped head
    capsys.readouterr()
    assert export(draft_dir, tmp_path / "out", gemma) != 0
    assert "model type 'gemma2'" in capsys.readouterr().err and not (tmp_path / "out").exists()


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_the_draft_folder_is_untouched_and_out_is_kept_without_overwrite(toy, tmp_path, capsys):
    _, base_dir, _, draft_dir = toy
    before = _digests(draft_dir)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert export(draft_dir, out, base_dir) != 0
    assert "--overwrite" in capsys.readouterr().err and (out / "config.json").read_text() == "{}"
    assert export(draft_dir, out, base_dir, "--overwrite") == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert export(draft_dir, draft_dir, base_dir, "--overwrite") != 0  # never over its own input
    assert "draft folder itself" in capsys.readouterr().err
    assert _digests(draft_dir) == before


# ---- scripts/vllm_eagle_check.py's bookkeeping (vLLM itself is not needed) ------------------------

def test_the_check_rebuilds_what_vllms_draft_cache_holds_and_reruns_our_draft(toy):
    """Recorded propose calls -> per call (h_p, token at p+1) for p = 0..p*: vLLM's shift, later calls
    overwriting a position's entry (a rejected branch's hidden state), a new request starting afresh."""
    from conftest import load_script

    check = load_script("vllm_eagle_check")
    base, _, draft, _ = toy
    d = draft.config.hidden_size
    h = torch.randn(12, d, dtype=torch.float64)

    def call(positions, ids, nxt, hidden):
        return {"positions": torch.tensor(positions), "ids": torch.tensor(ids), "hidden": hidden,
                "next": nxt, "proposed": [0, 0]}

    calls = [call([0, 1, 2, 3], [5, 6, 7, 8], 9, h[:4]),  # prefill: tokens at 0..3, the base's next token 9
             call([4, 5], [9, 11], 12, h[4:6]),  # a decode step, two valid tokens
             call([5, 6], [11, 13], 14, h[6:8]),  # position 5 again, with another hidden state
             call([0, 1], [20, 21], 22, h[8:10])]  # the next request
    inputs = check.draft_inputs(calls)
    hid, nxt, _ = inputs[2]
    assert nxt.tolist() == [6, 7, 8, 9, 11, 13, 14]
    assert torch.equal(hid, torch.cat([h[:5], h[6:8]]))
    assert inputs[3][1].tolist() == [21, 22] and torch.equal(inputs[3][0], h[8:10])
    rows = check.our_proposals(draft, inputs)
    for (hid, nxt, _), (first, _, path) in zip(inputs, rows):
        assert first == int(draft(hid[None], nxt[None]).logits[0, -1].argmax())  # teacher-forced, last position
        assert path[0] == first and len(path) == 2
