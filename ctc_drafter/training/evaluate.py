"""A draft's loss on a batch (either architecture, sampled positions or every position; the training
step uses it too) and its loss and greedy-decode metrics over every trainable position of held-out
sequences."""

from __future__ import annotations

import torch

from .data import Batch, HiddenReader, TrainSequence, make_batch
from .losses import ARPositionTerms, ar_dense_losses, ar_losses, compute_losses, symbol_labels
from .metrics import DraftMetrics, batch_sums, frame_sums


def draft_losses(out, hidden, positions, labels, loss_len, kind: str, config):
    """Either architecture's training loss -> (LossParts, the frame logits [B,P,L,N+1] for metrics)."""
    if isinstance(out, tuple):  # ARTrainOutput: frames + features
        return ar_losses(out, hidden, positions, labels, loss_len, config), out.frames
    return compute_losses(out, labels, loss_len, kind, config.num_tokens), out


def batch_losses(model, hidden, batch: Batch, token_to_symbol, kind: str, config):
    """The draft's pass and loss on one batch -> (LossParts, greedy-decode sums on the device).

    A batch of every position (batch.positions None, the AR draft) runs one teacher-forced pass that
    scores the heads its trained positions read; sampled positions gather their frames [B,P,L,N+1]."""
    labels, loss_len = symbol_labels(batch.labels, batch.label_len, token_to_symbol)
    ctc = config.loss == "ctc"
    if batch.positions is None:
        terms = ARPositionTerms(labels.clamp(min=0), loss_len, batch.label_len, config)
        out = model(hidden, batch.next_ids, None, terms=terms)
        lp = ar_dense_losses(out, hidden, loss_len, batch.label_len, config)
        trained = batch.label_len > 0  # the M positions of out.terms, in the same order
        sums = frame_sums(out.terms["best"][None], labels[trained][None], batch.label_len[trained][None],
                          config.num_tokens, ctc)
        return lp, sums
    out = model(hidden, batch.next_ids, batch.positions)  # [B,P,L,N+1] (AR: + features)
    lp, logits = draft_losses(out, hidden, batch.positions, labels.clamp(min=0), loss_len, kind, config)
    return lp, batch_sums(logits.detach(), labels, batch.label_len, config.num_tokens, ctc)


@torch.no_grad()
def evaluate_draft(draft, base, seqs: list[TrainSequence], kind: str, positions: int = 64, hidden_fn=None,
                   reader: HiddenReader | None = None) -> DraftMetrics:
    """Loss and greedy-decode metrics of `draft` over every trainable position of `seqs` (one process).

    The AR draft scores a whole sequence in one pass; the NAR draft `positions` positions per pass."""
    cfg = draft.config
    k = cfg.label_len
    reader = reader or HiddenReader()
    dev = next(draft.parameters()).device
    metrics = DraftMetrics(k)
    to_sym = draft.token_to_symbol()
    was_training = draft.training
    draft.eval()
    every = getattr(draft, "every_position", False)
    for s in seqs:
        valid = torch.nonzero(s.label_len > 0).flatten()
        for chunk in [None] if every else valid.split(positions):
            batch = make_batch([s], [chunk], k, reader).to(dev)
            if hidden_fn is not None:
                hidden = hidden_fn(batch)
            else:
                hidden = batch.hidden if batch.hidden is not None else \
                    base.forward(batch.input_ids, None, logits_at=slice(0, 0))[0]
            lp, sums = batch_losses(draft, hidden, batch, to_sym, kind, cfg)
            metrics.add_loss(lp.parts, lp.num_positions)
            metrics.add_sums(sums)
    draft.train(was_training)
    return metrics
