"""EAGLE-3's draft layout: `"layout": "eagle3"`, term for term vLLM's Eagle3LlamaForCausalLM (one layer).

Data flow (d = base hidden size, A = len(aux_layers), N = draft vocabulary (draft_vocab, or V)):

    accepted position t:  g_t = fc(concat(a_t^1 .. a_t^A)) [d]   -- a^i: the base's residual stream entering
                                                                     layer aux_layers[i] (BaseModel.layer_inputs)
    every level:          u = concat(input_norm(emb(x)) [d], hidden_norm(g) [d])  -- embedding first
                          r = g + attn(u)      (q/k/v read 2d; causal, cached; the base's rope)
                          o = r + mlp(post_norm(r))                               -- o: the level's state
                          -> norm(o) -> the base head's rows of the N draft tokens -> level logits [N]
    level j >= 1 (speculative, scratch KV past the accepted length): g = o of level j-1 (no fc), x = its
        top-1 token, at position t+j

so the first level reads the base's layers through fc and deeper ones the draft's own state, as EAGLE-3
drafts. The draft vocabulary is kept sorted by token id (d2t = vocab_ids - arange, t2d its mask in the
export). With the CTC term a blank logit joins the token rows as in the AR layout (blank last); vLLM drafts
its top-1 token, which is the top-1 non-blank symbol our levels feed on, so the exported chain is the same.

Our decoding loop runs it as the AR draft once the base's passes return the aux states
(BaseModel.hidden_layers, set by the engine that binds the draft: decoding/generate.py). Trained as the AR draft (training/losses.py: token
cross-entropy at t and the CTC window over the heads t..t+L-1, no feature regression: EAGLE-3 dropped it), on the aux states of a base pass, plus the same terms
over one step unrolled on the draft's own states (`unrolled`: EAGLE-3's training-time test, one step), so
the state that deeper levels read is trained too.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CTCDrafterError
from .ar_model import ARDenseOutput, ARDraftModel
from .cache import DraftCache
from .config import DraftConfig
from .model import DecoderLayer


class Eagle3Layer(DecoderLayer):
    """A Llama layer whose attention reads [input_norm(embedding) ; hidden_norm(state)] (2d wide)."""

    def __init__(self, cfg: DraftConfig):
        super().__init__(cfg)
        d, hd = cfg.hidden_size, cfg.head_dim
        self.hidden_norm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)
        a = self.attn
        a.q_proj = nn.Linear(2 * d, a.nh * hd, bias=False)
        a.k_proj = nn.Linear(2 * d, a.nkv * hd, bias=False)
        a.v_proj = nn.Linear(2 * d, a.nkv * hd, bias=False)

    def attn_input(self, x):
        """x [B,n,2d] = concat(state, embedding) (`Eagle3DraftModel._fuse`) -> the attention's input [B,n,2d]."""
        g, e = x.chunk(2, dim=-1)
        return torch.cat([self.input_norm(e), self.hidden_norm(g)], -1)

    def kv(self, x, cos, sin):
        return self.attn.kv(self.attn_input(x), cos, sin)

    def forward(self, x, cos, sin, k, v, mask):
        r = x.chunk(2, dim=-1)[0] + self.attn(self.attn_input(x), cos, sin, k, v, mask)  # the state is the residual
        y = self.post_norm(r)
        return r + self.down(torch.nn.functional.silu(self.gate(y)) * self.up(y))


class Eagle3DraftModel(ARDraftModel):
    """fc over the aux states + one Eagle3Layer + final norm + the head's draft-vocabulary rows (+ blank).

    Levels, binding, the proposal vocabulary, save/load and the training terms are the AR draft's; the
    layer, the fc in front of the first level and the unrolled training step are its own."""

    def __init__(self, config: DraftConfig):
        super().__init__(config)
        d = config.hidden_size
        self.fuse = nn.Linear(len(config.aux_layers) * d, d, bias=False)  # vLLM's `fc`
        self.layers = nn.ModuleList([Eagle3Layer(config)])

    def init_weights(self, seed: int = 0) -> "Eagle3DraftModel":
        """The AR init, with fc starting as "take the deepest aux state" (closest to the base's last one)."""
        super().init_weights(seed)
        d = self.config.hidden_size
        deepest = max(range(len(self.config.aux_layers)), key=lambda i: self.config.aux_layers[i])
        w = torch.randn(self.fuse.weight.shape, generator=torch.Generator().manual_seed(seed + 1))
        w = w / w.shape[1] ** 0.5 * 0.1
        w[:, deepest * d:(deepest + 1) * d] += torch.eye(d)
        with torch.no_grad():
            self.fuse.weight.copy_(w)
        return self

    def set_vocab(self, token_ids) -> "Eagle3DraftModel":
        """The draft vocabulary, sorted by token id (EAGLE-3's d2t order)."""
        return super().set_vocab(torch.as_tensor(token_ids, dtype=torch.long).flatten().sort().values)

    def combine(self, aux):
        """aux [B,n,A*d] (BaseModel.layer_inputs) -> g [B,n,d]: vLLM's combine_hidden_states."""
        return self.fuse(aux.to(self.fuse.weight.dtype))

    def _fuse(self, hidden, ids):
        """hidden [B,n,d] (fc's output or the draft's own state), ids [B,n] -> the layer's input pair [B,n,2d]."""
        w = self.fuse.weight.dtype
        return torch.cat([hidden.to(w), self._embed(ids).to(w)], -1)

    @torch.no_grad()
    def extend(self, hidden, next_ids, cache: DraftCache):
        """hidden [B,n,A*d]: the aux states at positions cache.length..+n-1; next_ids [B,n]. -> o of the newest [B,d]."""
        if hidden.shape[-1] != self.fuse.in_features:
            raise CTCDrafterError(f"an eagle3 draft reads base layers {self.config.aux_layers} ({self.fuse.in_features} "
                                  f"wide), given states {hidden.shape[-1]} wide: set the base's hidden_layers to them "
                                  "(SpeculativeDecoder does)")
        return super().extend(self.combine(hidden), next_ids, cache)

    def forward(self, hidden, next_ids, positions_sel=None, terms=None):
        """Training pass over aux states hidden [B,T,A*d]. With positions (sampled): ARDraftModel.forward
        after fc. Without (every position): that pass and one unrolled step (`unrolled`), each scored by
        `terms` against the same labels, summed (the metrics' greedy frames are the first pass's)."""
        if positions_sel is not None:
            return super().forward(self.combine(hidden), next_ids, positions_sel, terms)
        f1, f2 = self.unrolled(self.combine(hidden), next_ids)
        t1, t2 = terms(f1, self._head_parts), terms(f2, self._head_parts)
        return ARDenseOutput(f1, {k: t1[k] if k == "best" else t1[k] + t2[k] for k in t1})

    def unrolled(self, g, next_ids):
        """EAGLE-3's training-time test, one step: g [B,T,d] = fc(aux), next_ids [B,T] ->
        f1 [B,T,d], the teacher-forced states (level 0 of position p), and f2 [B,T,d]: at p, what level 1
        computes when the accepted positions end at p-1: the layer over (f1 at p-1, the token at p+1) at
        position p, attending to the first pass's keys of 0..p-1 and its own. f2 at p predicts what f1 at
        p does (the token after next_ids[p]), from the draft's own state, as levels >= 1 read at decode."""
        B, T, _ = g.shape
        layer = self.layers[0]
        pos = torch.arange(T, device=g.device).expand(B, T)
        cos, sin = self._rope(g, pos)
        x1 = self._fuse(g, next_ids)
        k1, v1 = layer.kv(x1, cos, sin)
        causal = torch.ones(T, T, dtype=torch.bool, device=g.device).tril()
        f1 = layer(x1, cos, sin, k1, v1, causal[None, None])
        x2 = self._fuse(torch.cat([f1[:, :1], f1[:, :-1]], 1), next_ids)  # p = 0 has no earlier state: its own
        k2, v2 = layer.kv(x2, cos, sin)
        mask = torch.cat([causal.tril(-1), torch.eye(T, dtype=torch.bool, device=g.device)], -1)  # [T,2T]
        f2 = layer(x2, cos, sin, torch.cat([k1, k2], 2), torch.cat([v1, v2], 2), mask[None, None])
        return f1, f2


def new_eagle3_draft_for(base, seed: int = 0, **overrides) -> Eagle3DraftModel:
    """A freshly initialised eagle3-layout draft shaped for `base` (a BaseModel); aux_layers default to vLLM's."""
    cfg = DraftConfig.from_base_config(base.config, base_model=base.name,
                                       **{**overrides, "architecture": "ar", "layout": "eagle3"})
    return Eagle3DraftModel(cfg).init_weights(seed).to(device=base.device, dtype=base.dtype).bind(base.model)
