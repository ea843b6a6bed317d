"""The autoregressive CTC draft: the reference code's drafting mode (its `model/cnets.py` + `topK_genrate`).

Data flow (d = base hidden size, N = proposal tokens, blank last at N; `levels` = config.num_frames):

    accepted position t:  fuse(concat(h_t [d], emb(x_{t+1}) [d])) -> decoder layer(s), causal, cached
        -> f_t [d], an estimate of the base's next hidden state h_{t+1}
        -> RMSNorm -> [base LM head rows of the N tokens (frozen) ; blank head] -> level 0 [N+1]
    level j >= 1 (speculative, scratch KV past the accepted length):
        fuse(concat(f_{t+j-1}, emb(top-1 token of level j-1))) -> same layer(s) at position t+j -> level j

Unlike the non-autoregressive draft (draft/model.py: L frames from one state) each level sees the
draft's own previous choice, as EAGLE does. The levels' log-prob rows [levels, N+1] then feed the
same tree policies as frames (decoding/proposers/frame_trees.py): blank is a symbol, CTC collapses.

Training is teacher-forced over whole sequences (one pass): f_t regresses h_{t+1}, its head predicts
x_{t+2}, and the heads at t..t+L-1 serve as the L frames of a CTC term over the window
x_{t+2}..x_{t+k+1}. Every position trains in that one pass (`forward` without positions: the loss
terms read the heads they need in chunks, training/losses.py `ARPositionTerms`); with sampled
positions the frames are gathered into [B,P,L,N+1] (`ar_losses`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .cache import DraftCache
from .config import DraftConfig
from .model import CTCDraftModel, DecoderLayer


class ARTrainOutput(NamedTuple):
    frames: torch.Tensor  # [B,P,L,N+1] logits of the heads at t..t+L-1 for each selected t
    features: torch.Tensor  # [B,P,d] f_t at each selected t (regresses the base's h_{t+1})


class ARDenseOutput(NamedTuple):
    features: torch.Tensor  # [B,T,d] f_t at every t
    terms: dict  # name -> [M,...]: what `terms` computed at the M trained positions (training/losses.py)


class ARDraftModel(CTCDraftModel):
    """EAGLE-style head with a CTC blank. Borrows binding, the proposal vocabulary, the frozen head
    and save/load from CTCDraftModel; only the frame machinery differs."""

    every_position = True  # `forward` without positions trains every position in one pass

    def __init__(self, config: DraftConfig):
        super().__init__(config)
        # The frame expansion of the NAR draft has no place here: levels come from running the
        # context layers again, so its parameters must not be saved, trained or initialised.
        del self.frame_embed, self.frame_layer

    def _layers(self, x, positions, cache: DraftCache | None, start: int, mask):
        """x [B,n,d] at `positions` [B,n]; with a cache, keys/values go to rows start..start+n-1."""
        cos, sin = self._rope(x, positions)
        for i, layer in enumerate(self.layers):
            k, v = layer.kv(x, cos, sin)
            if cache is not None:
                k, v = cache.layer(i).write(start, k, v)  # views over rows 0..start+n-1
            x = layer(x, cos, sin, k, v, mask)
        return x

    def _fuse(self, hidden, ids):
        """hidden [B,n,d] (base states or the draft's own features), ids [B,n] -> [B,n,d]."""
        w = self.fuse.weight.dtype
        return self.fuse(torch.cat([hidden.to(w), self._embed(ids).to(w)], -1))

    # ---- decoding ------------------------------------------------------------------------------

    @torch.no_grad()
    def extend(self, hidden, next_ids, cache: DraftCache):
        """Add accepted positions: hidden [B,n,d] (base states at cache.length..+n-1), next_ids [B,n]
        (the base token after each). Returns f of the newest position [B,d]."""
        B, n, _ = hidden.shape
        start = cache.length
        positions = torch.arange(start, start + n, device=hidden.device).expand(B, n)
        mask = torch.ones(n, start + n, dtype=torch.bool, device=hidden.device).tril(start)[None, None]
        f = self._layers(self._fuse(hidden, next_ids), positions, cache, start, mask)
        cache.length = start + n
        return f[:, -1]

    @torch.no_grad()
    def levels(self, f_last, cache: DraftCache, n: int | None = None, min_path_prob: float = 0.0):
        """f_last [B,d] (feature of position t = cache.length-1) -> level log-probs [B,m,N+1] (float32), m <= n.

        Level j+1 is conditioned on the top-1 token symbol of level j (blank excluded: the collapsed
        path's next token) and on the draft's own feature. Their keys go to scratch rows past the
        accepted length, overwritten by the next `extend`: the cache never rolls back.
        min_path_prob: stop once the top-1 path's probability is below it in every batch row (0: never).
        Without a blank the top-1 path is the likeliest of its depth, so every node a deeper level could
        add scores lower still (with one, nearly so); each level is a memory-bound pass worth skipping.
        """
        n = self.config.num_frames if n is None else n
        B = f_last.shape[0]
        blank = self.config.blank_id
        symbols = self.vocab_ids
        f = f_last[:, None]  # [B,1,d]
        rows = [torch.log_softmax(self.frame_logits(f, fast=True).float(), dim=-1)]  # each [B,1,N+1]
        cut = math.log(min_path_prob) if min_path_prob > 0 else None
        path = torch.zeros(B, 1, device=f.device)  # log P(top-1 path so far) [B,1]
        for j in range(1, n):
            top, sym = rows[-1][:, :, :blank].max(-1)  # [B,1]
            path = path + top
            if cut is not None and bool((path < cut).all()):
                break
            tok = sym if symbols is None else symbols[sym]
            pos = cache.length - 1 + j
            positions = torch.full((B, 1), pos, device=f.device)
            f = self._layers(self._fuse(f, tok), positions, cache, pos, None)  # sees rows 0..pos
            rows.append(torch.log_softmax(self.frame_logits(f, fast=True).float(), dim=-1))
        return torch.cat(rows, 1)

    def frames(self, s_last, cache: DraftCache):
        """The NAR entry point, for callers that ask any draft for its frames: the levels."""
        return self.levels(s_last, cache)

    # ---- training ------------------------------------------------------------------------------

    def forward(self, hidden, next_ids, positions_sel=None, terms=None):
        """Teacher-forced pass: hidden [B,T,d], next_ids [B,T].

        positions_sel [B,P] (long) -> ARTrainOutput: frame j of position t is the head at t+j (clamped
        to T-1; the label window's length masks what lies past a sequence's end).
        positions_sel None -> ARDenseOutput: f at every position and `terms(f, head)`, where head(rows
        [R,d]) gives the token and blank logits of those rows (`_head_parts`); the terms pick the rows
        they need, so the [B,T,N+1] logits are never built whole."""
        B, T, d = hidden.shape
        dev = hidden.device
        pos = torch.arange(T, device=dev).expand(B, T)
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()[None, None]
        f = self._layers(self._fuse(hidden, next_ids), pos, None, 0, causal)  # [B,T,d]
        if positions_sel is None:
            return ARDenseOutput(f, terms(f, self._head_parts))
        L = self.config.num_frames
        logits = self.frame_logits(f)  # [B,T,N+1]
        idx = (positions_sel[:, :, None] + torch.arange(L, device=dev)).clamp(max=T - 1)  # [B,P,L]
        P = positions_sel.shape[1]
        frames = torch.gather(logits, 1, idx.reshape(B, P * L, 1).expand(-1, -1, logits.shape[-1]))
        feats = torch.gather(f, 1, positions_sel[..., None].expand(B, P, d))
        return ARTrainOutput(frames.view(B, P, L, -1), feats)

    def _head_parts(self, f):
        """f [..., d] -> (token logits [..., N], blank logit [..., 1], None without a blank): `frame_logits`
        without the concatenation into [..., N+1], a copy the every-position loss does without."""
        y = self.norm(f)
        return self._head(y), (None if self.config.loss == "ce" else self.blank_head(y))


def new_ar_draft_for(base, seed: int = 0, **overrides) -> ARDraftModel:
    """A freshly initialised AR draft shaped for `base` (a BaseModel)."""
    cfg = DraftConfig.from_base_config(base.config, base_model=base.name, **{**overrides, "architecture": "ar"})
    return ARDraftModel(cfg).init_weights(seed).to(device=base.device, dtype=base.dtype).bind(base.model)
