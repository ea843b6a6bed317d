"""The draft encodes positions with its base's own rotary embedding class (draft/rotary.py base_rotary).

For a plain-rope base (the shipped default draft on SmolLM2) the draft's frames are bit-identical to
what the draft's former hand-written rope gave, kept below as a five-line reference formula; for a
base with Llama-3.1 `llama3` rope scaling the draft gets the base's scaled frequencies, which that
plain formula does not give.
"""

import pytest
import torch
from torch import nn

from conftest import tiny_llama
from ctc_drafter.draft import SHIPPED_DRAFT, DraftCache, load_draft_folder, new_ar_draft_for, new_draft_for
from ctc_drafter.models.base import BaseModel


class PlainRope(nn.Module):
    """Reference: the rope formula the draft used before it took the base's class (theta only, no scaling)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))

    def forward(self, x, positions):  # positions [B,T] -> cos, sin [B,T,hd]
        f = positions.float()[..., None] * self.inv_freq.to(positions.device)
        emb = torch.cat((f, f), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def draft_outputs(draft, d, seed=0, T=9):
    """Frames of a random context via both entry points: decoding (extend + frames) and training (forward)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, T, d, generator=g)
    ids = torch.randint(0, draft.config.vocab_size, (1, T), generator=g)
    cache = DraftCache()
    s = draft.extend(hidden, ids, cache)
    with torch.no_grad():
        train = draft(hidden, ids, torch.tensor([[2, 5, T - 1]]))
    out = draft.frames(s, cache)
    return out, (train.frames if hasattr(train, "frames") else train)


def with_plain_rope(draft):
    """The same draft with its rotary swapped for the reference formula (restored by the caller)."""
    draft.rotary = PlainRope(draft.config.head_dim, draft.config.rope_theta)
    return draft


@pytest.mark.slow
def test_shipped_draft_frames_unchanged_by_the_base_rotary():
    from ctc_drafter.models.base import load_base_model

    base = load_base_model("default", device="cpu", dtype="float32")
    draft = load_draft_folder(SHIPPED_DRAFT).bind(base.model)
    assert base.config.rope_parameters["rope_type"] == "default"  # SmolLM2: plain rope
    assert type(draft.rotary) is type(base.model.model.rotary_emb)
    new = draft_outputs(draft, draft.config.hidden_size)
    base_rotary = draft.rotary
    old = draft_outputs(with_plain_rope(draft), draft.config.hidden_size)
    draft.rotary = base_rotary
    for a, b in zip(new, old):
        assert torch.equal(a, b)


def llama31_like(seed=0):
    """Tiny float32 Llama with Llama-3.1's rope scaling (original context 64: most frequencies scaled)."""
    model = tiny_llama(dtype=torch.float32, seed=seed)
    cfg = model.config
    cfg.rope_parameters = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    from transformers import LlamaForCausalLM

    scaled = LlamaForCausalLM(cfg).eval()
    scaled.load_state_dict(model.state_dict())
    return BaseModel(scaled, None, "toy-llama3")


@pytest.mark.parametrize("make", [new_draft_for, new_ar_draft_for])
def test_draft_gets_the_bases_scaled_rope(make):
    base = llama31_like()
    draft = make(base, seed=0)
    x = torch.zeros(1, 1, dtype=torch.float32)
    positions = torch.arange(0, 300, 7)[None]  # [1,T], past the original context
    cos, sin = draft._rope(x, positions)  # [1,1,T,hd]
    base_cos, base_sin = base.model.model.rotary_emb(x, positions)  # the base's own, [1,T,hd]
    assert torch.equal(cos[:, 0], base_cos) and torch.equal(sin[:, 0], base_sin)
    plain_cos, _ = PlainRope(draft.config.head_dim, draft.config.rope_theta)(x, positions)
    assert not torch.allclose(cos[:, 0], plain_cos, atol=1e-3), "llama3 scaling did not change the frequencies"
    # and the frames depend on it: the same weights with the plain formula propose differently
    scaled_frames = draft_outputs(draft, draft.config.hidden_size)
    plain_frames = draft_outputs(with_plain_rope(draft), draft.config.hidden_size)
    assert not torch.allclose(scaled_frames[1], plain_frames[1])


def test_unscaled_tiny_draft_matches_the_reference_formula():
    """Both architectures on a plain-rope tiny base: base class and reference formula agree exactly."""
    base = BaseModel(tiny_llama(dtype=torch.float32), None, "toy")
    for make in (new_draft_for, new_ar_draft_for):
        draft = make(base, seed=0)
        new = draft_outputs(draft, draft.config.hidden_size)
        old = draft_outputs(with_plain_rope(draft), draft.config.hidden_size)
        for a, b in zip(new, old):
            assert torch.equal(a, b)


def test_partial_rotary_base_rotates_what_the_base_rotates():
    """Phi rotates half of each head: so does its draft (the other half passes through unrotated)."""
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    lm = PhiForCausalLM(PhiConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, partial_rotary_factor=0.5)).eval()
    draft = new_draft_for(BaseModel(lm, None, "toy-phi"), seed=0)
    x, positions = torch.zeros(1, 1), torch.arange(6)[None]
    cos, _ = draft._rope(x, positions)
    assert cos.shape[-1] == draft.config.head_dim // 2
    assert torch.equal(cos[:, 0], lm.model.rotary_emb(x, positions)[0])
    attn, h, r = draft.layers[0].attn, torch.randn(1, 6, 32), cos.shape[-1]
    k_rot, _ = attn.kv(h, *draft._rope(x, positions))  # [1,nkv,6,hd]
    k_plain = attn._heads(attn.k_proj(h), attn.nkv)
    assert torch.equal(k_rot[..., r:], k_plain[..., r:]) and not torch.allclose(k_rot[..., :r], k_plain[..., :r])
    frames, _ = draft_outputs(draft, 32)
    assert torch.isfinite(frames).all()


def test_base_without_rope_gets_plain_rope():
    """GPT-2 has absolute positions, no rotary to share: the draft keeps plain rope with its rope_theta."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, bos_token_id=None,
                                    eos_token_id=None)).eval()
    draft = new_draft_for(BaseModel(lm, None, "toy-gpt2"), seed=0)
    x, positions = torch.zeros(1, 1), torch.arange(0, 90, 9)[None]
    cos, sin = draft._rope(x, positions)
    ref_cos, ref_sin = PlainRope(draft.config.head_dim, draft.config.rope_theta)(x, positions)
    assert torch.equal(cos[:, 0], ref_cos) and torch.equal(sin[:, 0], ref_sin)
