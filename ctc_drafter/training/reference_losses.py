"""The reference recipe's losses (CTC-drafter's `train/main.py`), over every position of whole sequences,
for the eagle1 layout (draft/eagle1_model.py).

Sequence x of T tokens, the base's hidden states h (h_t after token t), trained positions M (see
reference_data.py: the reference's loss mask, the last position dropped):

    draft input at t    h_t (plus uniform noise while training: `add_uniform_noise`), x_{t+1}
    feature  (v_w 1.0)  SmoothL1(f_t, h_{t+1}), mean over d
    token    (p_w 0.1)  cross-entropy of head(f_t) against softmax(head(h_{t+1})), the base's own distribution
    ctc      (c_w 0.01) per window start p: CTC of the draft's log-probs at p..p+5 (6 frames) against the
                        base's greedy tokens argmax head(h_{p+1..p+3}) (3 labels), blank = token 0

Feature and token losses are summed over M and divided by |M| + 1e-5, as the reference does; CTC is
the mean over windows of NLL / 3 (`nn.CTCLoss(reduction="mean")` divides by the label length).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..draft.eagle1_model import BLANK_TOKEN
from .losses import LossParts

CTC_FRAMES = 6  # consecutive positions' draft logits in one CTC term (the reference's `range(6)`)
CTC_LABELS = 3  # tokens each window is aligned to (`--fixlen 3`)
REFERENCE_WEIGHTS = {"feature": 1.0, "token": 0.1, "ctc": 0.01}  # v_w, p_w, c_w
NOISE_STD = 0.2  # `"noise": "uniform", "std": 0.2`
_NEG = -1e9  # "impossible" in the CTC recursion: finite, so backward never meets -inf - -inf


def _wide(x: torch.Tensor) -> torch.Tensor:
    """x in float32 at least (bf16/fp16 autocast outputs widened; float64 kept, for exact tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def draft_input(hidden: torch.Tensor, lengths: torch.Tensor, training: bool, std: float = NOISE_STD) -> torch.Tensor:
    """The hidden states the draft reads: noised while training (as the reference's training set is), clean
    in evaluation (its test set is not)."""
    return add_uniform_noise(hidden, lengths, std) if training and std > 0 else hidden


def add_uniform_noise(hidden: torch.Tensor, lengths: torch.Tensor, std: float = NOISE_STD) -> torch.Tensor:
    """hidden [B,T,d] + U(-1/2, 1/2) * std * 512 / T_b: the reference's `AddUniformNoise`, whose scale
    shrinks with the sequence's own length T_b (lengths [B]; padding past it gets noise too, unread)."""
    scale = std * 512 / lengths.to(torch.float32).clamp(min=1)  # [B]
    noise = (torch.rand(hidden.shape, device=hidden.device) - 0.5) * scale[:, None, None]
    return (hidden.float() + noise).to(hidden.dtype)


def ctc_window_starts(trained: torch.Tensor, labels: int = CTC_LABELS, frames: int = CTC_FRAMES) -> list[int]:
    """trained [T] bool (one unpadded sequence) -> the start p of each CTC window (`slice_func_fix`).

    Runs of trained positions among the first T - (frames - 1) (the reference cuts `loss_mask[:-5]`);
    a run s..e with e - s >= labels gives windows s..e - labels + 1, each of whose labels stay inside
    the run; shorter runs give none (the reference skips them)."""
    T = trained.numel()
    m = trained[: max(0, T - (frames - 1))].tolist()
    starts, s = [], None
    for i, v in enumerate(m + [False]):
        if v and s is None:
            s = i
        elif not v and s is not None:
            e = i - 1
            if e - s >= labels:
                starts.extend(range(s, e - labels + 2))
            s = None
    return starts


def ctc_nll(emit: torch.Tensor, ext: torch.Tensor) -> torch.Tensor:
    """CTC negative log-likelihood of each window by the forward recursion.

    emit [n,W,S]: log-prob of extended label s at frame w; ext [n,S] the extended labels (blank, l1,
    blank, l2, ..., blank; S = 2K+1). Exact over every alignment, differentiable; only the blank and
    the K label columns of each frame are needed, not the vocabulary."""
    n, W, S = emit.shape
    emit = _wide(emit)
    skip = torch.zeros(n, S, dtype=torch.bool, device=emit.device)  # s-2 -> s: a label after another one
    skip[:, 3::2] = ext[:, 3::2] != ext[:, 1:-2:2]
    neg = emit.new_full((n, 1), _NEG)
    alpha = torch.cat([emit[:, 0, :2], neg.expand(n, S - 2)], 1)  # start in the first blank or label
    for w in range(1, W):
        a1 = torch.cat([neg, alpha[:, :-1]], 1)
        a2 = torch.where(skip, torch.cat([neg, neg, alpha[:, :-2]], 1), neg)
        alpha = torch.logsumexp(torch.stack([alpha, a1, a2]), 0) + emit[:, w]
    return -torch.logsumexp(alpha[:, -2:], 1)  # end in the last label or the blank after it


def reference_ctc_loss(logp: torch.Tensor, greedy: torch.Tensor, trained: torch.Tensor, lengths: torch.Tensor,
                       blank: int = BLANK_TOKEN) -> tuple[torch.Tensor | None, int]:
    """logp [B,T,V] draft log-probs, greedy [B,T] the base's argmax of head(h_{t+1}), trained [B,T] bool,
    lengths [B] -> (mean over windows of NLL / labels, or None without a window; the window count).

    A window whose labels include the blank token itself is skipped (CTC cannot emit the blank; the
    reference's blank, Vicuna's <unk>, is never the base's argmax)."""
    B, T, V = logp.shape
    K, W = CTC_LABELS, CTC_FRAMES
    starts = [(b, p) for b in range(B) for p in ctc_window_starts(trained[b, : int(lengths[b])].cpu())]
    if not starts:
        return None, 0
    bp = torch.tensor(starts, device=logp.device)  # [n,2]
    rows = bp[:, :1] * T + bp[:, 1:]  # flat row of each window's start
    labels = greedy.reshape(-1)[rows + torch.arange(K, device=logp.device)]  # [n,K]
    keep = (labels != blank).all(1)
    rows, labels = rows[keep], labels[keep]
    if labels.shape[0] == 0:
        return None, 0
    ext = torch.full((labels.shape[0], 2 * K + 1), blank, dtype=torch.long, device=logp.device)
    ext[:, 1::2] = labels
    frames = rows + torch.arange(W, device=logp.device)  # [n,W]
    emit = logp.reshape(B * T, V)[frames[:, :, None], ext[:, None, :]]  # [n,W,2K+1]
    return (ctc_nll(emit, ext) / K).mean(), int(labels.shape[0])


def reference_losses(features: torch.Tensor, logits: torch.Tensor, hidden: torch.Tensor, trained: torch.Tensor,
                     lengths: torch.Tensor, head, weights: dict = REFERENCE_WEIGHTS) -> LossParts:
    """features [B,T,d] f_t, logits [B,T,V] head(f_t), hidden [B,T,d] the base's clean h_t, trained [B,T]
    bool (t < T_b - 1 wherever set), lengths [B], head: the base's LM head -> the weighted sum and parts."""
    w = {**REFERENCE_WEIGHTS, **weights}
    target = torch.cat([hidden[:, 1:], torch.zeros_like(hidden[:, :1])], 1)  # h_{t+1} [B,T,d]
    with torch.no_grad():
        target_logits = _wide(head(target.to(features.dtype)))  # [B,T,V]
        target_p = torch.softmax(target_logits, -1)
        greedy = target_logits.argmax(-1)  # [B,T]
    logp = torch.log_softmax(_wide(logits), -1)
    m = trained.to(logp.dtype)
    count = m.sum()
    token = -(m[..., None] * target_p * logp).sum() / (count + 1e-5)
    feat = F.smooth_l1_loss(_wide(features), _wide(target), reduction="none").mean(-1)  # [B,T]
    feature = (m * feat).sum() / (count + 1e-5)
    total = w["feature"] * feature + w["token"] * token
    parts = {"feature": float(feature.detach()), "token": float(token.detach())}
    if w["ctc"] > 0:
        ctc, windows = reference_ctc_loss(logp, greedy, trained, lengths)
        if ctc is not None:
            total = total + w["ctc"] * ctc
            parts["ctc"] = float(ctc.detach())
    with torch.no_grad():
        hits = ((logits.argmax(-1) == greedy) & trained).sum()
    n = int(count)
    parts["acc"] = float(hits) / max(n, 1)  # top-1 of the draft == the base's greedy token, as the reference logs
    parts["loss"] = float(total.detach())
    return LossParts(total, parts, n)
