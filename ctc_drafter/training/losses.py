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


def ar_loss_weights(config) -> dict:
    """The weights a draft was (or is being) trained with: config.extra["ar_loss_weights"] over the defaults."""
    return {**AR_LOSS_WEIGHTS, **(config.extra or {}).get("ar_loss_weights", {})}


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
    target = torch.gather(hidden, 1, nxt[..., None].expand(B, P, d)).to(out.features.dtype)
    feat = F.smooth_l1_loss(out.features.float(), target.float(), reduction="none").mean(-1)  # [B,P]
    feature = (feat * valid).sum() / n
    tok = out.frames[:, :, 0, : config.num_tokens].float()  # head at t, blank excluded
    nll = F.cross_entropy(tok.reshape(B * P, -1), labels[..., 0].reshape(-1), reduction="none").view(B, P)
    token = (nll * valid).sum() / n
    ctc = compute_losses(out.frames, labels, loss_len, "ctc", config.num_tokens).total if ar_uses_ctc(config) else None
    total, parts = _ar_total(feature, token, ctc, w)
    return LossParts(total, parts, int(valid.sum()))


# Logit elements of one chunk of positions in the every-position pass (x L with the CTC term, whose
# frames are copied per chunk): about 128 MB in fp32. The shipped recipe's batches (4 sequences of a
# few hundred tokens, N+1 = 8193) fit in one chunk; longer or wider ones are chunked and checkpointed.
LOGIT_CHUNK = 1 << 25


class ARPositionTerms:
    """Per-position terms of the AR draft's heads at every position of a batch; ARDraftModel.forward
    (without positions) calls it on one chunk of positions at a time.

    labels [B,T,k] symbols (>= 0), loss_len [B,T] (0: t does not train). Returns, for positions
    t0..t0+c-1: token [B,c] (cross-entropy of the head at t against the window's first label, blank
    excluded), ctc [B,c] (when weighted: the heads t..t+L-1 as the frames of the window) and best
    [B,c] (the head's greedy symbol, for the metrics). Padding and untrained positions get finite
    values that `ar_dense_losses` masks."""

    def __init__(self, labels: torch.Tensor, loss_len: torch.Tensor, config):
        self.labels, self.loss_len, self.config = labels, loss_len, config
        self.ctc = ar_uses_ctc(config)
        width = (config.num_tokens + 1) * (config.num_frames if self.ctc else 1)
        self.chunk = max(1, LOGIT_CHUNK // (labels.shape[0] * width))  # positions per chunk

    def __call__(self, logits: torch.Tensor, t0: int, c: int) -> dict:
        """logits [B,n,N+1]: the heads t0..t0+n-1, n = min(c+L-1, T-t0)."""
        N, L = self.config.num_tokens, self.config.num_frames
        B, n, _ = logits.shape
        lab, ln = self.labels[:, t0: t0 + c], self.loss_len[:, t0: t0 + c]  # [B,c,k], [B,c]
        head = logits[:, :c]
        token = F.cross_entropy(head[..., :N].float().flatten(0, 1), lab[..., 0].flatten(), reduction="none")
        out = {"token": token.view(B, c), "best": greedy_frames(head.detach(), N, self.config.loss == "ctc")}
        if self.ctc:
            lp = torch.log_softmax(logits.float(), dim=-1)  # [B,n,N+1]
            idx = (torch.arange(c, device=lp.device)[:, None] + torch.arange(L, device=lp.device)).clamp(max=n - 1)
            frames = lp[:, idx].flatten(0, 1).transpose(0, 1)  # [L,B*c,N+1]: frame j of t is the head at t+j
            lengths = torch.full((B * c,), L, dtype=torch.long, device=lp.device)
            # untrained positions get a 1-label window (masked later): no empty targets in the kernel
            nll = F.ctc_loss(frames, lab.flatten(0, 1), lengths, ln.flatten().clamp(min=1), blank=N,
                             reduction="none", zero_infinity=True)
            out["ctc"] = nll.view(B, c)
        return out


def ar_dense_losses(out, hidden: torch.Tensor, loss_len: torch.Tensor, config) -> LossParts:
    """out: ARDenseOutput (features [B,T,d], terms of ARPositionTerms); hidden [B,T,d] the base's states;
    loss_len [B,T] -> the loss of `ar_losses` over every position whose window starts inside the
    proposal vocabulary (the same numbers as `ar_losses` given all of them as positions)."""
    w = ar_loss_weights(config)
    valid = loss_len > 0  # [B,T]
    n = max(int(valid.sum()), 1)
    T = hidden.shape[1]
    nxt = torch.arange(1, T + 1, device=hidden.device).clamp(max=T - 1)
    target = hidden[:, nxt].to(out.features.dtype)  # h_{t+1} [B,T,d], clamped at T-1
    feat = F.smooth_l1_loss(out.features.float(), target.float(), reduction="none").mean(-1)  # [B,T]
    mean = lambda x: (x * valid).sum() / n  # noqa: E731
    ctc = mean(out.terms["ctc"]) if "ctc" in out.terms else None
    total, parts = _ar_total(mean(feat), mean(out.terms["token"]), ctc, w)
    return LossParts(total, parts, int(valid.sum()))

