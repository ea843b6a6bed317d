"""The eagle3 draft layout (draft/eagle3_model.py), the base's aux layer states it reads, its training
(`train --layout eagle3`, with and without the CTC term) and `export --format eagle3` (draft/export.py):
the checkpoint's keys and shapes, its forward as vLLM's llama_eagle3.py computes it, the round trip and
the refusals. No vLLM needed (scripts/vllm_eagle3_check.py runs it)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from conftest import tiny_llama
from ctc_drafter.cli.main import main as cli_main
from ctc_drafter.draft import (DraftCache, DraftConfig, Eagle3DraftModel, load_draft, load_draft_folder,
                               new_ar_draft_for, new_eagle1_draft_for, new_eagle3_draft_for)
from ctc_drafter.draft.config import default_aux_layers
from ctc_drafter.draft.export import import_eagle3
from ctc_drafter.errors import CTCDrafterError
from ctc_drafter.models.base import BaseModel
from test_train import data_dir, read_log, small_base, small_model_dir, train_cli  # noqa: F401 (fixtures)

N = 24  # draft vocabulary of the toy draft (of the base's 64)


@pytest.fixture
def toy(tmp_path):
    """(base with 6 layers, its HF folder, a saved eagle3 draft with a 24-token vocabulary, its folder)."""
    lm = tiny_llama(seed=3, layers=6)
    lm.config.rope_parameters = {"rope_type": "default", "rope_theta": 31000.0}  # must be copied
    base = BaseModel(lm, None, "toy")
    base_dir = tmp_path / "base"
    lm.save_pretrained(base_dir)
    draft = new_eagle3_draft_for(base, seed=1, draft_vocab=N)
    g = torch.Generator().manual_seed(7)
    draft.set_vocab(torch.randperm(64, generator=g)[:N])  # unsorted on purpose: the layout sorts it
    with torch.no_grad():  # norms away from 1, so a swapped norm shows
        for name, p in draft.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    draft_dir = tmp_path / "draft"
    draft.save_pretrained(draft_dir)
    return base, base_dir, draft, draft_dir


def export(draft_dir, out, base_dir, fmt="eagle3"):
    return cli_main(["export", "--format", fmt, str(draft_dir), str(out), "--base-model", str(base_dir)])


# ---- the layout ---------------------------------------------------------------------------------

def test_layout_defaults_to_vllms_aux_layers_and_has_eagle3s_shapes(toy):
    base, _, draft, _ = toy
    c = draft.config
    assert c.aux_layers == default_aux_layers(6) == [2, 3, 3] and c.architecture == "ar"
    d, hd = c.hidden_size, c.head_dim
    shapes = {k: tuple(v.shape) for k, v in draft.state_dict().items()}
    assert shapes["fuse.weight"] == (d, 3 * d)
    assert shapes["layers.0.attn.q_proj.weight"] == (c.num_attention_heads * hd, 2 * d)
    assert shapes["layers.0.attn.k_proj.weight"] == (c.num_key_value_heads * hd, 2 * d)
    assert shapes["layers.0.hidden_norm.weight"] == shapes["layers.0.input_norm.weight"] == (d,)
    assert draft.vocab_ids.tolist() == sorted(draft.vocab_ids.tolist())
    with pytest.raises(CTCDrafterError, match="no default EAGLE-3 aux layers"):
        default_aux_layers(2)
    with pytest.raises(CTCDrafterError, match="one layer"):
        DraftConfig(**{**c.to_dict(), "num_context_layers": 2}).validate()
    with pytest.raises(CTCDrafterError, match="aux_layers belongs to the eagle3 layout"):
        DraftConfig(**{**new_ar_draft_for(base).config.to_dict(), "aux_layers": [1]}).validate()


def test_the_base_hook_returns_the_residual_stream_entering_each_aux_layer(toy):
    """Layer input i == transformers' hidden_states[i] (0: the embeddings), concatenated in the draft's order,
    once per pass, and the hooks are gone after the block."""
    base, _, _, _ = toy
    ids = torch.randint(0, 64, (2, 9))
    layers = [4, 0, 2]
    with base.layer_inputs(layers) as got:
        base.forward(ids, None, logits_at=slice(0, 0))
        base.forward(ids[:, :5], None, logits_at=slice(0, 0))
    hs = base.model(ids, output_hidden_states=True).hidden_states
    assert len(got) == 2 and torch.equal(got[0], torch.cat([hs[i] for i in layers], -1))
    assert got[1].shape == (2, 5, 3 * 32)
    base.forward(ids, None, logits_at=slice(0, 0))
    assert len(got) == 2  # no hook left behind
    with pytest.raises(CTCDrafterError, match="has 6 decoder layers"):
        with base.layer_inputs([7]):
            pass


def test_levels_feed_the_drafts_own_state_and_match_a_fresh_pass(toy):
    """Level j >= 1 = the layer over (the previous level's state, its top-1 token) at the next position, with the
    accepted positions' keys in the cache: the same as one causal pass over that longer input."""
    base, _, draft, _ = toy
    aux = torch.randn(1, 7, 3 * 32, dtype=torch.float64)
    ids = torch.randint(0, 64, (1, 7))
    cache = DraftCache()
    o = draft.extend(aux, ids, cache)
    rows = draft.levels(o, cache, 3)[0]  # [3, N+1]
    g, tok, states = draft.combine(aux), ids, []
    for j in range(3):
        pos = torch.arange(g.shape[1])[None]
        causal = torch.ones(g.shape[1], g.shape[1], dtype=torch.bool).tril()[None, None]
        out = draft._layers(draft._fuse(g, tok), pos, None, 0, causal)[:, -1:]  # [1,1,d]
        logits = draft.frame_logits(out)[0, 0]
        torch.testing.assert_close(torch.log_softmax(logits.float(), -1), rows[j], rtol=1e-5, atol=1e-5)
        nxt = draft.vocab_ids[logits[:N].argmax()]
        g, tok = torch.cat([g, out], 1), torch.cat([tok, nxt.view(1, 1)], 1)
    assert cache.length == 7  # levels never move the accepted length


def test_the_unrolled_training_step_is_what_level_1_computes_at_decode(toy):
    """f2 at p (training) == level 1 when the accepted positions end at p-1: the layer over (the draft's own
    state at p-1, the token at p+1) at position p, with the accepted keys cached; f1 == the accepted states."""
    _, _, draft, _ = toy
    aux = torch.randn(1, 8, 3 * 32, dtype=torch.float64)
    ids = torch.randint(0, 64, (1, 8))
    f1, f2 = draft.unrolled(draft.combine(aux), ids)
    for p in (1, 4, 7):
        cache = DraftCache()
        o = draft.extend(aux[:, :p], ids[:, :p], cache)  # accepted positions 0..p-1
        torch.testing.assert_close(o, f1[:, p - 1])
        lvl = draft._layers(draft._fuse(o[:, None], ids[:, p:p + 1]), torch.tensor([[p]]), cache, p, None)
        torch.testing.assert_close(lvl[:, 0], f2[:, p])


def test_an_eagle3_folder_round_trips_and_its_engine_sets_the_bases_hidden_layers(toy):
    base, _, draft, draft_dir = toy
    back = load_draft_folder(draft_dir, dtype=torch.float64).bind(base.model)
    assert isinstance(back, Eagle3DraftModel) and back.config == draft.config
    # from_pretrained builds in float32, then casts: a float64 draft comes back rounded to float32
    assert all(torch.equal(back.state_dict()[k], v.float().to(v.dtype) if v.is_floating_point() else v)
               for k, v in draft.state_dict().items())
    with pytest.raises(CTCDrafterError, match="set the base's hidden_layers"):
        back.extend(torch.zeros(1, 2, 32, dtype=torch.float64), torch.tensor([[1, 2]]), DraftCache())
    loaded, trained = load_draft(str(draft_dir), base)
    assert trained and isinstance(loaded, Eagle3DraftModel) and base.hidden_layers is None
    from ctc_drafter.decoding import CTCDrafter
    CTCDrafter(base, loaded, proposer="ctc")  # the engine that binds the draft sets the base's layers
    assert base.hidden_layers == [2, 3, 3]
    ids = torch.randint(0, 64, (1, 5))
    hidden, _ = base.forward(ids, None)  # the base's passes now return the aux states
    assert hidden.shape == (1, 5, 3 * 32)
    assert torch.equal(hidden[..., :32], base.model(ids, output_hidden_states=True).hidden_states[2])


@pytest.mark.parametrize("generator,budget,vocab", [("medusa", 20, 0), ("prefix", 12, 40), ("beam", 12, 40)])
def test_decoding_with_an_eagle3_draft_is_lossless(tmp_path, first_arm, generator, budget, vocab):
    """Our loop with an eagle3 draft loaded as a user's folder: greedy output == HF generate's, and some steps
    accept drafted tokens (fc starts as "take the deepest aux layer", here the last layer's output)."""
    from ctc_drafter.decoding import CTCDrafter
    from test_exactness import hf_greedy

    base = BaseModel(tiny_llama(seed=1, layers=6), None, "toy")
    folder = tmp_path / "d"
    draft = new_eagle3_draft_for(base, seed=0, aux_layers=[1, 3, 6], draft_vocab=vocab)
    if vocab:
        draft.set_vocab(torch.randperm(64, generator=torch.Generator().manual_seed(0))[:vocab])
    draft.save_pretrained(folder)
    draft, _ = load_draft(str(folder), base)
    drafter = CTCDrafter(base, draft, generator=generator, budget=budget, proposer="ctc", switch=first_arm)
    g = torch.Generator().manual_seed(budget)
    longest = 1
    for _ in range(3):
        ids = torch.randint(0, 64, (1, int(torch.randint(1, 12, (), generator=g))), generator=g)
        spec = drafter.generate(ids, max_new_tokens=30)
        assert spec.tokens == hf_greedy(base.model, ids, 30) and sum(spec.accept_lengths) == 30
        longest = max(longest, max(spec.accept_lengths))
    assert longest > 1, "no step accepted a draft token: the multi-token path is untested"


# ---- export -------------------------------------------------------------------------------------

def test_keys_shapes_and_config_are_what_vllms_eagle3_loader_reads(toy, tmp_path):
    base, base_dir, draft, draft_dir = toy
    assert export(draft_dir, tmp_path / "out", base_dir) == 0
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    c = draft.config
    d, hd, nh, nkv, m = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads, c.intermediate_size
    p = "midlayer."
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "fc.weight": (d, 3 * d), "norm.weight": (d,), "lm_head.weight": (N, d), "d2t": (N,), "t2d": (64,),
        p + "input_layernorm.weight": (d,), p + "hidden_norm.weight": (d,),
        p + "self_attn.q_proj.weight": (nh * hd, 2 * d), p + "self_attn.k_proj.weight": (nkv * hd, 2 * d),
        p + "self_attn.v_proj.weight": (nkv * hd, 2 * d), p + "self_attn.o_proj.weight": (d, nh * hd),
        p + "post_attention_layernorm.weight": (d,), p + "mlp.gate_proj.weight": (m, d),
        p + "mlp.up_proj.weight": (m, d), p + "mlp.down_proj.weight": (d, m)}
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
    assert int(tensors["t2d"].sum()) == N
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["num_hidden_layers"] == 1
    assert (cfg["draft_vocab_size"], cfg["vocab_size"], cfg["target_hidden_size"]) == (N, 64, d)
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [2, 3, 3]
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 31000.0}


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def eagle3_as_vllm_computes(t, cfg: dict, embed, g, ids):
    """Eagle3LlamaForCausalLM's layer 0, final norm, lm_head and d2t over the exported tensors `t`, written out
    from llama_eagle3.py: g [1,T,d] the states (fc's output, or the previous level's pre-norm state), ids [1,T].
    -> (pre-norm states [1,T,d], target-vocabulary logits [1,T,V] with -inf off the draft vocabulary)."""
    eps, T = cfg["rms_norm_eps"], ids.shape[1]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    p = "midlayer."
    u = torch.cat([_rms(embed(ids), t[p + "input_layernorm.weight"], eps), _rms(g, t[p + "hidden_norm.weight"], eps)], -1)
    heads = lambda x, n: x.view(1, T, n, hd).transpose(1, 2)  # noqa: E731
    q = heads(F.linear(u, t[p + "self_attn.q_proj.weight"]), nh)
    k = heads(F.linear(u, t[p + "self_attn.k_proj.weight"]), nkv)
    v = heads(F.linear(u, t[p + "self_attn.v_proj.weight"]), nkv)
    config = LlamaConfig(**{k_: v_ for k_, v_ in cfg.items() if k_ != "architectures"})
    cos, sin = LlamaRotaryEmbedding(config)(g, torch.arange(T)[None])
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    a = F.scaled_dot_product_attention(q, k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1),
                                       is_causal=True)
    r = g + F.linear(a.transpose(1, 2).reshape(1, T, nh * hd), t[p + "self_attn.o_proj.weight"])
    y = _rms(r, t[p + "post_attention_layernorm.weight"], eps)
    o = r + F.linear(F.silu(F.linear(y, t[p + "mlp.gate_proj.weight"])) * F.linear(y, t[p + "mlp.up_proj.weight"]),
                     t[p + "mlp.down_proj.weight"])
    draft_logits = F.linear(_rms(o, t["norm.weight"], eps), t["lm_head.weight"])
    full = draft_logits.new_full((1, T, cfg["vocab_size"]), float("-inf"))
    full[..., torch.arange(cfg["draft_vocab_size"]) + t["d2t"]] = draft_logits  # compute_logits' mapping
    return o, full


def test_the_checkpoint_computes_our_draft_in_vllms_eagle3_forward(toy, tmp_path):
    """fc's column order, the [embedding ; state] order, which norm is which, the head rows and d2t, the copied
    rope, checked by computing: first level teacher-forced and two deeper levels on the draft's own states."""
    base, base_dir, draft, draft_dir = toy
    assert export(draft_dir, tmp_path / "out", base_dir) == 0
    t = {k: (v.double() if v.is_floating_point() else v) for k, v in
         load_file(str(tmp_path / "out" / "model.safetensors")).items()}
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    g = torch.Generator().manual_seed(0)
    aux = torch.randn(1, 9, 3 * 32, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 64, (1, 9), generator=g)
    embed = base.model.get_input_embeddings()
    h = F.linear(aux, t["fc.weight"])  # combine_hidden_states
    cache = DraftCache()
    o = draft.extend(aux, ids, cache)
    ours = draft.levels(o, cache, 3)[0][:, :N]  # [3,N] token log-probs, blank dropped
    for j in range(3):
        states, logits = eagle3_as_vllm_computes(t, cfg, embed, h, ids)
        theirs = logits[0, -1]
        assert int(theirs.argmax()) == int(draft.vocab_ids[ours[j].argmax()])
        torch.testing.assert_close(torch.log_softmax(theirs[draft.vocab_ids], -1).float(),
                                   torch.log_softmax(ours[j], -1), rtol=1e-5, atol=1e-5)
        assert torch.isinf(theirs).sum() == 64 - N
        h = torch.cat([h, states[:, -1:]], 1)  # vLLM's next level: the pre-norm state, no fc
        ids = torch.cat([ids, theirs.argmax().view(1, 1)], 1)


def test_round_trip_gives_back_the_drafts_tensors_and_the_heads_rows(toy, tmp_path):
    base, base_dir, draft, draft_dir = toy
    assert export(draft_dir, tmp_path / "out", base_dir) == 0
    sd, head = import_eagle3(load_file(str(tmp_path / "out" / "model.safetensors")), draft.config)
    mine = draft.state_dict()
    assert set(sd) == set(mine) - {"blank_head.weight", "blank_head.bias"}
    assert all(torch.equal(sd[k], mine[k]) for k in sd)
    assert torch.equal(head, base.model.get_output_embeddings().weight[draft.vocab_ids].to(head.dtype))


def test_a_whole_vocabulary_draft_exports_without_maps(toy, tmp_path):
    base, base_dir, _, _ = toy
    folder = tmp_path / "full"
    new_eagle3_draft_for(base, aux_layers=[1, 3, 6], loss="ce").save_pretrained(folder)
    assert export(folder, tmp_path / "out", base_dir) == 0
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert "d2t" not in tensors and "t2d" not in tensors and tensors["lm_head.weight"].shape == (64, 32)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["draft_vocab_size"] == 64 and cfg["eagle_aux_hidden_state_layer_ids"] == [1, 3, 6]


@pytest.mark.parametrize("kind, fmt, reason", [
    ("eagle1", "eagle3", "a draft of the eagle1 layout reads the last state alone: train with --layout eagle3"),
    ("ar", "eagle3", "a draft of the standard layout reads the last state alone"),
    ("eagle3", "eagle", "an eagle3-layout draft reads several base layers, which EAGLE-1 does not: use --format eagle3"),
])
def test_other_layouts_are_refused_in_one_line(toy, tmp_path, capsys, kind, fmt, reason):
    base, base_dir, _, draft_dir = toy
    if kind == "eagle1":
        draft_dir = tmp_path / "e1"
        new_eagle1_draft_for(base).save_pretrained(draft_dir)
    elif kind == "ar":
        draft_dir = tmp_path / "ar"
        new_ar_draft_for(base).save_pretrained(draft_dir)
    capsys.readouterr()
    code = export(draft_dir, tmp_path / "out", base_dir, fmt)
    err = capsys.readouterr().err
    assert code != 0 and len(err.strip().splitlines()) == 1 and reason in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_base_with_fewer_layers_than_the_draft_reads_is_refused(toy, tmp_path, capsys):
    _, _, _, draft_dir = toy
    short = tmp_path / "short"
    tiny_llama(layers=2).save_pretrained(short)
    capsys.readouterr()
    assert export(draft_dir, tmp_path / "out", short) != 0
    assert "reads base layers [2, 3, 3]; the base has 2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---- training -----------------------------------------------------------------------------------

@pytest.mark.parametrize("ctc_weight", ["0.1", "0"])
def test_train_layout_eagle3_lowers_the_loss_with_and_without_ctc(small_model_dir, small_base, data_dir, tmp_path,
                                                                  ctc_weight):
    """On shards without hidden states the base runs each step and the draft reads its aux layers."""
    out = tmp_path / "e3"
    assert train_cli(small_model_dir, data_dir, out, "--layout", "eagle3", "--config", '{"aux_layers": [0, 1, 2]}',
                     "--ctc-weight", ctc_weight, "--draft-vocab", 48, "--positions", "all", "--epochs", 4,
                     "--lr", 1e-2, "--eval-frac", 0.25) == 0
    trained = load_draft_folder(out).bind(small_base.model)
    c = trained.config
    assert isinstance(trained, Eagle3DraftModel) and c.layout == "eagle3" and c.aux_layers == [0, 1, 2]
    assert c.loss == ("ce" if ctc_weight == "0" else "ctc") and c.draft_vocab == 48
    assert c.extra["ar_loss_weights"] == {"feature": 0.0, "token": 1.0, "ctc": float(ctc_weight)}
    steps = [r for r in read_log(out) if r["event"] == "step"]
    assert steps[-1]["loss"] < 0.8 * steps[0]["loss"], (steps[0], steps[-1])
    assert steps[-1]["feature"] == 0.0 and ("ctc" in steps[-1]) == (ctc_weight != "0")


def test_train_refuses_a_feature_weight_for_eagle3(small_model_dir, data_dir, tmp_path, capsys):
    capsys.readouterr()
    assert train_cli(small_model_dir, data_dir, tmp_path / "x", "--layout", "eagle3", "--feature-weight", 1) != 0
    assert "no feature loss" in capsys.readouterr().err


# ---- scripts/vllm_eagle_check.py --format eagle3's bookkeeping (vLLM itself is not needed) -----------

def test_the_vllm_check_scores_an_eagle3_draft_over_the_base_vocabulary(toy):
    """vLLM hands its EAGLE-3 proposer the aux states [n, 3d]; the check reruns our draft on them and names its
    first level and top-1 path by base token id (draft-vocabulary rows through vocab_ids, blank excluded)."""
    from conftest import load_script

    check = load_script("vllm_eagle_check")
    _, _, draft, _ = toy
    aux = torch.randn(7, 3 * 32, dtype=torch.float64)
    calls = [{"positions": torch.arange(5), "ids": torch.tensor([5, 6, 7, 8, 9]), "hidden": aux[:5], "next": 10,
              "proposed": [0, 0, 0]},
             {"positions": torch.tensor([5, 6]), "ids": torch.tensor([10, 11]), "hidden": aux[5:], "next": 12,
              "proposed": [0, 0, 0]}]
    inputs = check.draft_inputs(calls)
    rows = check.our_proposals(draft, inputs)
    for (hid, nxt, _), (first, _, path) in zip(inputs, rows):
        T = hid.shape[0]
        frames = draft(hid[None], nxt[None], torch.tensor([[T - 1]])).frames[0, 0, 0]  # the head at T-1 [N+1]
        assert first == int(draft.vocab_ids[frames[:N].argmax()]) and first in draft.vocab_ids.tolist()
        assert path[0] == first and len(path) == 3 and all(t in draft.vocab_ids.tolist() for t in path)
