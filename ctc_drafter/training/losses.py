"""Training losses over draft frame logits.

    ctc     CTC over the L frames (blank = N, after the N token symbols), labels = the window y[t+1..t+len]
    ce      Medusa-style: frame j predicts label j by cross-entropy over the vocabulary (no blank)
    ctc+ce  their sum (the draft still decodes with CTC)

Both are summed over a position's labels and averaged over positions, so they share one scale
(negative log-likelihood of a label window). The autoregressive draft adds feature regression and a
token cross-entropy to a weighted CTC term (`ar_losses` on sampled positions, `ar_dense_losses` on
every position at once, at the end).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .metrics import greedy_frames

LOSSES = ("ctc", "ce", "ctc+ce")


def symbol_labels(labels: torch.Tensor, label_len: torch.Tensor, token_to_symbol: torch.Tensor | None):
    """Token labels -> frame symbols for a draft with a proposal vocabulary.

    labels [B,P,k] token ids, label_len [B,P] -> (symbol labels [B,P,k], -1 for a token outside the
    vocabulary; loss lengths [B,P], each window cut before its first such token). The metrics keep the
    full windows: an outside token is a miss there, as it is at decode time.
    """
    if token_to_symbol is None:
        return labels, label_len
    sym = token_to_symbol[labels]
    k = labels.shape[-1]
    inside = (sym >= 0) | (torch.arange(k, device=labels.device) >= label_len[..., None])
    # length of the all-inside prefix of each window
    loss_len = torch.minimum(inside.long().cumprod(-1).sum(-1), label_len)
    return sym, loss_len


@dataclass
class LossParts:
    total: torch.Tensor  # scalar, what backward runs on
    parts: dict  # name -> float, for logs
    num_positions: int


def ctc_loss(logits: torch.Tensor, labels: torch.Tensor, label_len: torch.Tensor, blank: int) -> torch.Tensor:
    """logits [N,L,V+1] (valid positions only), labels [N,k], label_len [N] (>= 1) -> mean NLL over positions.

    zero_infinity: a window that needs more frames than L (k plus its repeats) cannot be aligned; it
    then contributes nothing instead of an infinite loss.
    """
    N, L, _ = logits.shape
    lp = torch.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # [L,N,V+1]
    frames = torch.full((N,), L, dtype=torch.long, device=logits.device)
    nll = F.ctc_loss(lp, labels, frames, label_len, blank=blank, reduction="none", zero_infinity=True)
    return nll.sum() / max(N, 1)


def ce_loss(logits: torch.Tensor, labels: torch.Tensor, label_len: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Frame j vs label j (j < min(L, len)), over the vocabulary only: summed per position, mean over positions."""
    N, L, _ = logits.shape
    k = labels.shape[1]
    n = min(L, k)
    tok = logits[:, :n, :vocab_size].float()  # [N,n,V]
    valid = torch.arange(n, device=logits.device)[None] < label_len[:, None]  # [N,n]
    nll = F.cross_entropy(tok.reshape(N * n, vocab_size), labels[:, :n].reshape(-1), reduction="none").view(N, n)
    return (nll * valid).sum() / max(N, 1)


def compute_losses(logits: torch.Tensor, labels: torch.Tensor, label_len: torch.Tensor, kind: str,
                   vocab_size: int) -> LossParts:
    """logits [B,P,L,N+1], labels [B,P,k] (symbols), label_len [B,P] (0 = padding) -> the `kind` loss and parts.

    vocab_size: N, the token symbols per frame (the blank is N)."""
    valid = label_len > 0
    if bool(valid.all()):  # the usual case: a view, no copy of the (large) logits and no scatter in backward
        lg, lab, ln = logits.flatten(0, 1), labels.flatten(0, 1), label_len.flatten()
    else:
        lg, lab, ln = logits[valid], labels[valid], label_len[valid]  # [N,L,V+1], [N,k], [N]
    parts = {}
    total = logits.new_zeros((), dtype=torch.float32)
    if lg.shape[0] == 0:  # every window starts outside the proposal vocabulary: nothing to learn here
        total = logits.float().sum() * 0.0  # still a graph through every parameter (DDP waits for all grads)
        parts.update({name: 0.0 for name in ("ctc", "ce") if name in kind.split("+")}, loss=0.0)
        return LossParts(total, parts, 0)
    if kind in ("ctc", "ctc+ce"):
        c = ctc_loss(lg, lab, ln, blank=vocab_size)
        parts["ctc"] = float(c.detach())
        total = total + c
    if kind in ("ce", "ctc+ce"):
        c = ce_loss(lg, lab, ln, vocab_size)
        parts["ce"] = float(c.detach())
        total = total + c
    parts["loss"] = float(total.detach())
    return LossParts(total, parts, int(valid.sum()))


# ---- the autoregressive draft (draft/ar_model.py) ------------------------------------------------

# The reference code's weights: EAGLE's feature regression 1.0 and token cross-entropy 0.1, plus a CTC
# term 0.01. CTC weight 0 is EAGLE-style (the draft is then saved with loss "ce": no blank symbol).
AR_LOSS_WEIGHTS = {"feature": 1.0, "token": 0.1, "ctc": 0.01}
# The eagle3 layout's: EAGLE-3 has no feature regression (its input is several layers, not the state the
# draft would regress); token and CTC keep the reference's 10:1.
EAGLE3_LOSS_WEIGHTS = {"feature": 0.0, "token": 1.0, "ctc": 0.1}


def default_loss_weights(layout: str | None) -> dict:
    return EAGLE3_LOSS_WEIGHTS if layout == "eagle3" else AR_LOSS_WEIGHTS


def ar_loss_weights(config) -> dict:
    """The weights a draft was (or is being) trained with: config.extra["ar_loss_weights"] over the defaults."""
    return {**default_loss_weights(config.layout), **(config.extra or {}).get("ar_loss_weights", {})}


def _feature_loss(features, target_fn, valid, n, config) -> torch.Tensor:
    """Smooth L1 of f_t to h_{t+1} (mean over d), a mean over the valid positions; 0 for the eagle3 layout,
    whose `hidden` is its aux states, not a state f_t estimates."""
    if config.layout == "eagle3":
        return features.new_zeros((), dtype=torch.float32)
    feat = F.smooth_l1_loss(features.float(), target_fn().to(features.dtype).float(), reduction="none").mean(-1)
    return (feat * valid).sum() / n


def ar_uses_ctc(config) -> bool:
    """Whether the AR draft's loss has a CTC term (weight 0 trains without a blank: config.loss "ce")."""
    return ar_loss_weights(config)["ctc"] > 0 and config.loss == "ctc"


def _ar_total(feature, token, ctc, w) -> tuple[torch.Tensor, dict]:
    """The weighted sum of the AR loss's parts (each a scalar mean over positions; ctc None: no term)."""
    total = w["feature"] * feature + w["token"] * token
    parts = {"feature": float(feature.detach()), "token": float(token.detach())}
    if ctc is not None:
        total = total + w["ctc"] * ctc
        parts["ctc"] = float(ctc.detach())
    parts["loss"] = float(total.detach())
    return total, parts


def ar_losses(out, hidden: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor, loss_len: torch.Tensor,
              config) -> LossParts:
    """out: ARTrainOutput (frames [B,P,L,N+1], features [B,P,d]); hidden [B,T,d] the base's states;
    positions [B,P]; labels [B,P,k] symbols, loss_len [B,P] -> weighted feature + token + CTC loss.

    feature: smooth L1 of f_t to h_{t+1} (mean over d), token: cross-entropy of the head at t against
    x_{t+2} (the window's first label), ctc: the frames t..t+L-1 against the window (compute_losses).
    Each is a mean over the positions whose window starts inside the proposal vocabulary."""
    w = ar_loss_weights(config)
    B, P, d = out.features.shape
    T = hidden.shape[1]
    valid = loss_len > 0  # [B,P]: label 0 exists (so does h_{t+1}) and is a proposal symbol
    n = max(int(valid.sum()), 1)
    nxt = (positions + 1).clamp(max=T - 1)
    feature = _feature_loss(out.features, lambda: torch.gather(hidden, 1, nxt[..., None].expand(B, P, d)),
                            valid, n, config)
    tok = out.frames[:, :, 0, : config.num_tokens].float()  # head at t, blank excluded
    nll = F.cross_entropy(tok.reshape(B * P, -1), labels[..., 0].reshape(-1), reduction="none").view(B, P)
    token = (nll * valid).sum() / n
    ctc = compute_losses(out.frames, labels, loss_len, "ctc", config.num_tokens).total if ar_uses_ctc(config) else None
    total, parts = _ar_total(feature, token, ctc, w)
    return LossParts(total, parts, int(valid.sum()))


# Logit elements of one chunk of positions in the every-position pass (x L with the CTC term, whose
# frames are copied per chunk): 2048 positions at N+1 = 8193, ~64 MB per fp32 copy. The shipped
# recipe's batches (4 sequences of a few hundred tokens) fit in one chunk; wider ones are chunked.
LOGIT_CHUNK = 1 << 24


class ARPositionTerms:
    """The AR draft's loss terms and greedy frames at every trained position of a batch, computed
    inside its forward (ARDraftModel.forward without positions calls it with f [B,T,d] and its head).

    labels [B,T,k] symbols (>= 0), loss_len [B,T] (0: no loss at t), window_len [B,T] (0: t does not
    train; the metrics count these M positions, the loss those of them with loss_len > 0). Only the
    heads a trained position reads are computed: its own (token cross-entropy) and t+1..t+L-1 (its
    frames, clamped to T-1, for the CTC term and the metrics); prompt and padding rows cost nothing.
    They are scored `chunk` positions at a time; with several chunks each is checkpointed (its logits
    recomputed in backward), so memory holds one chunk's logits."""

    def __init__(self, labels: torch.Tensor, loss_len: torch.Tensor, window_len: torch.Tensor, config):
        self.labels, self.loss_len, self.trained, self.config = labels, loss_len, window_len > 0, config
        self.ctc = ar_uses_ctc(config)
        width = (config.num_tokens + 1) * (config.num_frames if self.ctc else 1)
        self.chunk = max(1, LOGIT_CHUNK // width)  # positions per chunk

    def __call__(self, f: torch.Tensor, head) -> dict:
        """-> per trained position (b-major, as `window_len > 0` selects them): token [M] (cross-entropy
        of the head at t against the window's first label, blank excluded), ctc [M] (when weighted: the
        heads t..t+L-1 as the frames of the window), best [M,L] (each frame's greedy symbol)."""
        B, T, _ = f.shape
        L = self.config.num_frames
        b, t = self.trained.nonzero(as_tuple=True)  # [M]
        frame_t = (t[:, None] + torch.arange(L, device=f.device)).clamp(max=T - 1)  # [M,L]
        need = torch.zeros(B, T, dtype=torch.bool, device=f.device)
        need[b[:, None], frame_t] = True
        rows = f[need]  # [R,d]: the heads some trained position reads, in (b, t) order
        frame_rows = (need.flatten().cumsum(0).view(B, T) - 1)[b[:, None], frame_t]  # [M,L], rising in (b, t, j)
        lab, ln = self.labels[b, t], self.loss_len[b, t]  # [M,k], [M]
        starts = range(0, b.numel(), self.chunk)
        outs = []
        for i0 in starts:
            i1 = min(i0 + self.chunk, b.numel())
            r0, r1 = int(frame_rows[i0, 0]), int(frame_rows[i1 - 1, -1]) + 1  # the chunk's rows: contiguous
            args = (head, rows[r0:r1], frame_rows[i0:i1] - r0, lab[i0:i1], ln[i0:i1])
            outs.append(self._chunk(*args) if len(starts) == 1 else checkpoint(self._chunk, *args, use_reentrant=False))
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    def _chunk(self, head, rows, idx, lab, ln) -> dict:
        """rows [r,d]; idx [c,L] each position's frames among the rows (its own head first); lab [c,k], ln [c]."""
        N, L = self.config.num_tokens, self.config.num_frames
        tok, blank = head(rows)  # [r,N], [r,1] or None
        tok = tok.float()
        own = torch.full((rows.shape[0],), -100, dtype=torch.long, device=rows.device)
        own[idx[:, 0]] = lab[:, 0]  # the label of the position whose own head each row is (-100: none)
        nll = F.cross_entropy(tok, own, ignore_index=-100, reduction="none")  # [r]
        if blank is None:
            best = tok.argmax(-1)  # fp32: a bf16 argmax is several times slower on CPUs
        else:  # the argmax over [tok, blank] (first index on ties), without concatenating them
            top, best = tok.max(-1)
            best = torch.where(blank[:, 0].float() > top, N, best)
        out = {"token": nll[idx[:, 0]], "best": best[idx]}
        if self.ctc:
            lp = torch.log_softmax(torch.cat([tok, blank.float()], -1), dim=-1)  # [r,N+1]
            frames = lp[idx].transpose(0, 1)  # [L,c,N+1]: frame j of t is the head at t+j
            lengths = torch.full((idx.shape[0],), L, dtype=torch.long, device=rows.device)
            # positions without a loss get a 1-label window (masked later): no empty targets in the kernel
            out["ctc"] = F.ctc_loss(frames, lab, lengths, ln.clamp(min=1), blank=N, reduction="none",
                                    zero_infinity=True)
        return out


def ar_dense_losses(out, hidden: torch.Tensor, loss_len: torch.Tensor, window_len: torch.Tensor, config) -> LossParts:
    """out: ARDenseOutput (features [B,T,d], terms of ARPositionTerms at the window_len > 0 positions);
    hidden [B,T,d] the base's states; loss_len, window_len [B,T] -> the loss of `ar_losses` over every
    position whose window starts inside the proposal vocabulary (the same numbers as `ar_losses` given
    all of them as positions)."""
    w = ar_loss_weights(config)
    valid = loss_len > 0  # [B,T]
    n = max(int(valid.sum()), 1)
    T = hidden.shape[1]
    nxt = torch.arange(1, T + 1, device=hidden.device).clamp(max=T - 1)
    feature = _feature_loss(out.features, lambda: hidden[:, nxt], valid, n, config)  # h_{t+1} [B,T,d], clamped at T-1
    own = valid[window_len > 0]  # [M]: which trained positions have a loss
    mean = lambda x, m: (x * m).sum() / n  # noqa: E731
    ctc = mean(out.terms["ctc"], own) if "ctc" in out.terms else None
    total, parts = _ar_total(feature, mean(out.terms["token"], own), ctc, w)
    return LossParts(total, parts, int(valid.sum()))
