"""The CTC draft model: the paper's Attention Draft Module with a CTC head.

Data flow (d = base hidden size, V = base vocabulary, N = proposal tokens (V, or draft_vocab), L = frames):

    h_t [d] (base last hidden state at t)  +  emb(x_{t+1}) [d]   -- x_{t+1}: the base's token there
        -> fuse: Linear(2d -> d)
        -> context layers: Llama-style causal decoder layers, incremental with their own KV cache
        -> s_t [d]
    frames: f_j = s_t + e_j (j < L, learned e_j), one decoder layer where the frames attend to the
        context (keys of s_{<=t}) and to each other (no causal order among frames)
        -> RMSNorm -> [base LM head rows of the N tokens (frozen, shared) ; blank head] -> logits [L, N+1]

CTC aligns the L frames to x_{t+2} .. x_{t+k+1}. The base's embedding and LM head are borrowed
(never saved with the draft): `bind(base)` attaches them.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CTCDrafterError
from .cache import DraftCache
from .config import DraftConfig
from .rotary import apply_rope, base_rotary


class Attention(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = nn.Linear(d, self.nh * hd, bias=False)
        self.k_proj = nn.Linear(d, self.nkv * hd, bias=False)
        self.v_proj = nn.Linear(d, self.nkv * hd, bias=False)
        self.o_proj = nn.Linear(self.nh * hd, d, bias=False)

    def _heads(self, x, n):  # [B,T,n*hd] -> [B,n,T,hd]
        B, T, _ = x.shape
        return x.view(B, T, n, self.hd).transpose(1, 2)

    def kv(self, x, cos, sin):
        k = self._heads(self.k_proj(x), self.nkv)
        v = self._heads(self.v_proj(x), self.nkv)
        return apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, k, v, mask):
        """x [B,Tq,d] queries; k, v [B,nkv,Tk,hd] every key (rotary applied); mask [B,1,Tq,Tk] bool."""
        q = self._heads(self.q_proj(x), self.nh)
        q = apply_rope(q, cos, sin)
        rep = self.nh // self.nkv
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        B, _, T, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DraftConfig):
        super().__init__()
        d = cfg.hidden_size
        self.input_norm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.post_norm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)
        self.gate = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.up = nn.Linear(d, cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, d, bias=False)

    def kv(self, x, cos, sin):
        return self.attn.kv(self.input_norm(x), cos, sin)

    def forward(self, x, cos, sin, k, v, mask):
        x = x + self.attn(self.input_norm(x), cos, sin, k, v, mask)
        y = self.post_norm(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


class CTCDraftModel(nn.Module):
    def __init__(self, config: DraftConfig):
        super().__init__()
        config.validate()
        self.config = config
        d = config.hidden_size
        self.fuse = nn.Linear(2 * d, d, bias=False)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_context_layers))
        self.frame_embed = nn.Parameter(torch.zeros(config.num_frames, d))
        self.frame_layer = DecoderLayer(config)
        self.norm = nn.RMSNorm(d, eps=config.rms_norm_eps)
        self.blank_head = nn.Linear(d, 1, bias=True)
        self.rotary = None  # the base's rotary embedding (base_rotary), built by `bind`
        if config.draft_vocab:
            # token id of each proposal symbol; set by `set_vocab` before training, saved with the weights
            self.register_buffer("vocab_ids", torch.arange(config.draft_vocab), persistent=True)
        else:
            self.vocab_ids = None
        self._base = None  # (embedding module, lm_head module), bound at run time, never saved
        self._bf16_head = None
        self._symbol_cache = None

    # ---- construction, saving, loading -------------------------------------------------------

    def init_weights(self, seed: int = 0) -> "CTCDraftModel":
        """Deterministic init (the same seed gives the same untrained draft everywhere)."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if "norm" in name:
                nn.init.ones_(p.data) if p.dim() == 1 else None
            elif p.dim() == 2 and name != "frame_embed":
                p.data.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            elif name == "frame_embed":
                p.data.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                p.data.zero_()
        # Start the fuse layer as "take h_t": an untrained draft then proposes roughly what the
        # base LM head would say, which trains faster than from noise.
        d = self.config.hidden_size
        with torch.no_grad():
            self.fuse.weight[:, :d] = torch.eye(d) + self.fuse.weight[:, :d] * 0.1
            self.fuse.weight[:, d:] *= 0.1
        return self

    def bind(self, lm) -> "CTCDraftModel":
        """Attach the base causal LM's embedding and LM head (frozen, shared) after checking shapes."""
        c = lm.config
        if int(c.hidden_size) != self.config.hidden_size:
            raise CTCDrafterError(
                f"draft was made for hidden size {self.config.hidden_size} ({self.config.base_model or 'unknown base'}), "
                f"base has {c.hidden_size}")
        if int(c.vocab_size) != self.config.vocab_size:
            raise CTCDrafterError(
                f"draft was made for vocabulary size {self.config.vocab_size} ({self.config.base_model or 'unknown base'}), "
                f"base has {c.vocab_size}")
        self._base = (lm.get_input_embeddings(), lm.get_output_embeddings())
        self.rotary = base_rotary(lm, self.config)  # float32 frequencies, as the base's
        self._bf16_head = None
        return self

    def bound_to(self, lm) -> bool:
        """Whether `bind(lm)` has been done (the same embedding and head modules are attached)."""
        return self._base is not None and self._base[0] is lm.get_input_embeddings() \
            and self._base[1] is lm.get_output_embeddings()

    def set_vocab(self, token_ids) -> "CTCDraftModel":
        """Choose the proposal vocabulary (draft_vocab distinct base token ids)."""
        ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
        n = self.config.draft_vocab
        if not n:
            raise CTCDrafterError("this draft proposes from the whole vocabulary (draft_vocab 0)")
        if ids.numel() != n or ids.unique().numel() != n or int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
            raise CTCDrafterError(f"the proposal vocabulary needs {n} distinct token ids below {self.config.vocab_size}")
        self.vocab_ids.copy_(ids.to(self.vocab_ids.device))
        self._bf16_head = self._symbol_cache = None
        return self

    def symbol_tokens(self) -> list[int] | None:
        """Token id of each frame symbol (blank excluded); None when symbol = token id."""
        if self.vocab_ids is None:
            return None
        if self._symbol_cache is None or self._symbol_cache[0] != self.vocab_ids.data_ptr():
            self._symbol_cache = (self.vocab_ids.data_ptr(), self.vocab_ids.tolist())
        return self._symbol_cache[1]

    def token_to_symbol(self) -> torch.Tensor | None:
        """[V] long: frame symbol of each base token, -1 outside the proposal vocabulary (None: identity)."""
        if self.vocab_ids is None:
            return None
        m = torch.full((self.config.vocab_size,), -1, dtype=torch.long, device=self.vocab_ids.device)
        m[self.vocab_ids] = torch.arange(self.vocab_ids.numel(), device=m.device)
        return m

    def _head_weight(self) -> torch.Tensor:
        """The base LM head's rows for the proposal vocabulary [N,d] (the whole head without a shortlist)."""
        w = self._base[1].weight
        return w if self.vocab_ids is None else w.index_select(0, self.vocab_ids.to(w.device))

    def save_pretrained(self, directory, dtype: torch.dtype | None = None) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory)
        sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
              for k, v in self.state_dict().items()}
        tmp = directory / "model.safetensors.tmp"
        save_file(sd, str(tmp), metadata={"format": "pt", "base_model": self.config.base_model})
        tmp.replace(directory / "model.safetensors")

    fingerprint: str | None = None  # sha256 (16 hex) of the weights file this draft was loaded from

    @classmethod
    def from_pretrained(cls, directory, device="cpu", dtype=torch.float32) -> "CTCDraftModel":
        from safetensors.torch import load_file

        directory = Path(directory)
        if not directory.is_dir():
            raise CTCDrafterError(f"draft model not found: {directory}")
        cfg = DraftConfig.load(directory)
        model = cls(cfg)
        try:
            sd = load_file(str(directory / "model.safetensors"))
        except FileNotFoundError as e:
            raise CTCDrafterError(f"draft {directory} has no model.safetensors") from e
        except Exception as e:  # noqa: BLE001 - safetensors raises its own types for corrupt files
            raise CTCDrafterError(f"draft weights {directory / 'model.safetensors'} are unreadable: {e}") from e
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:
            raise CTCDrafterError(f"draft weights in {directory} do not match its config.json") from e
        v = model.vocab_ids
        if v is not None and (v.unique().numel() != v.numel() or int(v.min()) < 0 or int(v.max()) >= cfg.vocab_size):
            raise CTCDrafterError(f"draft weights in {directory} have an invalid proposal vocabulary (vocab_ids)")
        # Which weights produced an answer file: eval records it, and resume refuses to mix two drafts.
        model.fingerprint = _sha256_16(directory / "model.safetensors")
        return model.to(device=device, dtype=dtype).eval()

    # ---- shared pieces -------------------------------------------------------------------------

    def _rope(self, x, positions):
        """x [B,T,...] (its dtype and device), positions [B,T] -> cos, sin [B,1,T,r] (broadcast over heads)."""
        if self.rotary is None:
            raise RuntimeError("draft is not bound to a base model; call draft.bind(base)")
        cos, sin = self.rotary(x, positions)
        return cos[:, None], sin[:, None]

    def _embed(self, ids):
        if self._base is None:
            raise RuntimeError("draft is not bound to a base model; call draft.bind(base)")
        return self._base[0](ids)

    def _head(self, y):
        """The frozen base LM head over the proposal vocabulary (rows sliced per call: cheap next to the matmul)."""
        head = self._base[1]
        if self.vocab_ids is None:
            return head(y)
        bias = None if getattr(head, "bias", None) is None else head.bias[self.vocab_ids]
        return F.linear(y, self._head_weight(), bias)

    def _proposal_head(self):
        """The LM head used for proposals at decode time.

        On CPU a bf16 copy of the frozen head runs ~2.5x faster than fp32 (26 -> 11 ms for 8 frames of
        SmolLM2). Proposals only steer which candidates are verified, never what is emitted, so this
        cannot change the output. Built once per bound head (and its device and dtype), from the
        proposal vocabulary's rows.
        """
        head = self._base[1]
        if getattr(head, "bias", None) is not None:
            return self._head
        key = (head, head.weight.device, head.weight.dtype)
        cached = getattr(self, "_bf16_head", None)
        if cached is None or cached[0] != key:
            w = self._head_weight().detach()  # frozen: slice (and cast) once, not per step
            if w.device.type == "cpu" and w.dtype == torch.float32:
                w = w.to(torch.bfloat16)
                fn = lambda y: F.linear(y.to(torch.bfloat16), w).float()  # noqa: E731
            else:
                fn = lambda y: F.linear(y, w)  # noqa: E731
            self._bf16_head = cached = (key, fn)
        return cached[1]

    def frame_logits(self, f, fast: bool = False):
        """f [..., d] frame states -> [..., N+1]: base LM head for the N proposal tokens, blank logit last."""
        y = self.norm(f)
        tok = self._proposal_head()(y) if fast else self._head(y)
        if self.config.loss == "ce":  # Medusa-style heads have no blank
            blank = torch.full_like(tok[..., :1], float("-inf"))
        else:
            blank = self.blank_head(y)
        return torch.cat([tok, blank.to(tok.dtype)], dim=-1)

    def _context_layers(self, x, positions, cache: DraftCache | None, causal_mask):
        """Context layers over new positions; with a cache their keys/values are written into it."""
        cos, sin = self._rope(x, positions)
        for i, layer in enumerate(self.layers):
            k, v = layer.kv(x, cos, sin)
            if cache is not None:
                k, v = cache.layer(i).write(cache.length, k, v)  # views over the past and the new positions
            x = layer(x, cos, sin, k, v, causal_mask)
        fk, fv = self.frame_layer.kv(x, cos, sin)  # frame layer's keys over the context states
        return x, (fk, fv)

    # ---- decoding (batch 1 in practice, written for B) -----------------------------------------

    @torch.no_grad()
    def extend(self, hidden, next_ids, cache: DraftCache):
        """Add accepted positions to the draft context.

        hidden [B,n,d]: base last hidden states at positions cache.length .. +n-1;
        next_ids [B,n]: the base token that follows each of them. Returns s of the newest [B,d].
        """
        B, n, _ = hidden.shape
        start = cache.length
        positions = torch.arange(start, start + n, device=hidden.device).expand(B, n)
        x = self.fuse(torch.cat([hidden.to(self.fuse.weight.dtype), self._embed(next_ids).to(self.fuse.weight.dtype)], -1))
        mask = torch.ones(n, start + n, dtype=torch.bool, device=hidden.device).tril(start)[None, None]
        s, (fk, fv) = self._context_layers(x, positions, cache, mask)
        cache.frame.write(start, fk, fv)
        cache.length = start + n
        return s[:, -1]

    @torch.no_grad()
    def frames(self, s_last, cache: DraftCache):
        """s_last [B,d] (state of position t = cache.length-1) -> frame log-probs [B,L,N+1] (float32)."""
        B, d = s_last.shape
        L, t = self.config.num_frames, cache.length - 1
        f = s_last[:, None, :] + self.frame_embed.to(s_last.dtype)[None]
        positions = torch.arange(t + 1, t + 1 + L, device=s_last.device).expand(B, L)
        cos, sin = self._rope(f, positions)
        k, v = self.frame_layer.kv(f, cos, sin)
        k_all, v_all = cache.frame.write(cache.length, k, v)  # scratch past the context: not kept
        f = self.frame_layer(f, cos, sin, k_all, v_all, None)  # frames see all context and each other
        return torch.log_softmax(self.frame_logits(f, fast=True).float(), dim=-1)

    # ---- training ------------------------------------------------------------------------------

    def forward(self, hidden, next_ids, positions_sel, valid=None):
        """Training pass over whole sequences.

        hidden [B,T,d], next_ids [B,T] (x_{t+1} at t), positions_sel [B,P] (long; the t's whose frames
        are trained). Returns frame logits [B,P,L,N+1] (model dtype).
        """
        B, T, d = hidden.shape
        P, L = positions_sel.shape[1], self.config.num_frames
        dev = hidden.device
        x = self.fuse(torch.cat([hidden.to(self.fuse.weight.dtype), self._embed(next_ids).to(self.fuse.weight.dtype)], -1))
        pos = torch.arange(T, device=dev).expand(B, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()[None, None]
        s, (ck, cv) = self._context_layers(x, pos, None, causal)
        # Frames of every selected position, flattened to P*L queries.
        s_sel = torch.gather(s, 1, positions_sel[..., None].expand(B, P, d))  # [B,P,d]
        f = (s_sel[:, :, None, :] + self.frame_embed.to(s.dtype)[None, None]).reshape(B, P * L, d)
        fpos = (positions_sel[:, :, None] + 1 + torch.arange(L, device=dev)).reshape(B, P * L)
        cos, sin = self._rope(f, fpos)
        fk, fv = self.frame_layer.kv(f, cos, sin)
        k_all, v_all = torch.cat([ck, fk], 2), torch.cat([cv, fv], 2)
        owner = positions_sel[:, :, None].expand(B, P, L).reshape(B, P * L)  # which t each frame belongs to
        see_ctx = torch.arange(T, device=dev)[None, None, :] <= owner[:, :, None]  # [B,PL,T]
        grp = torch.arange(P, device=dev).repeat_interleave(L)
        see_frames = (grp[:, None] == grp[None, :]).expand(B, P * L, P * L)
        mask = torch.cat([see_ctx, see_frames], -1)[:, None]
        f = self.frame_layer(f, cos, sin, k_all, v_all, mask)
        return self.frame_logits(f).view(B, P, L, -1)


def new_draft_for(base, seed: int = 0, **overrides) -> CTCDraftModel:
    """A freshly initialised NAR draft shaped for `base` (a BaseModel); draft/ar_model.py's new_ar_draft_for
    makes the AR one."""
    cfg = DraftConfig.from_base_config(base.config, base_model=base.name, **overrides)
    if cfg.architecture != "nar":
        raise CTCDrafterError(f"new_draft_for builds NAR drafts, not {cfg.architecture!r}; use new_ar_draft_for")
    return CTCDraftModel(cfg).init_weights(seed).to(device=base.device, dtype=base.dtype).bind(base.model)


def _sha256_16(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]
