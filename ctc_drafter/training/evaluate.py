"""A draft's loss on a batch (either architecture; the training step uses it too) and its loss and
greedy-decode metrics over every trainable position of held-out sequences."""

from __future__ import annotations

import torch

from .data import HiddenReader, TrainSequence, make_batch
from .losses import ar_losses, compute_losses, symbol_labels
from .metrics import DraftMetrics


def draft_losses(out, hidden, positions, labels, loss_len, kind: str, config):
    """Either architecture's training loss -> (LossParts, the frame logits [B,P,L,N+1] for metrics)."""
    if isinstance(out, tuple):  # ARTrainOutput: frames + features
        return ar_losses(out, hidden, positions, labels, loss_len, config), out.frames
    return compute_losses(out, labels, loss_len, kind, config.num_tokens), out



@torch.no_grad()
def evaluate_draft(draft, base, seqs: list[TrainSequence], kind: str, positions: int = 64, hidden_fn=None,
                   reader: HiddenReader | None = None) -> DraftMetrics:
    """Loss and greedy-decode metrics of `draft` over every trainable position of `seqs` (one process)."""
    cfg = draft.config
    k = cfg.label_len
    reader = reader or HiddenReader()
    dev = next(draft.parameters()).device
    metrics = DraftMetrics(k)
    to_sym = draft.token_to_symbol()
    was_training = draft.training
    draft.eval()
    for s in seqs:
        valid = torch.nonzero(s.label_len > 0).flatten()
        for chunk in valid.split(positions):
            batch = make_batch([s], [chunk], k, reader).to(dev)
            if hidden_fn is not None:
                hidden = hidden_fn(batch)
            else:
                hidden = batch.hidden if batch.hidden is not None else \
                    base.forward(batch.input_ids, None, logits_at=slice(0, 0))[0]
            out = draft(hidden, batch.next_ids, batch.positions)
            labels, loss_len = symbol_labels(batch.labels, batch.label_len, to_sym)
            lp, logits = draft_losses(out, hidden, batch.positions, labels.clamp(min=0), loss_len, kind, cfg)
            metrics.add_loss(lp.parts, lp.num_positions)
            metrics.add(logits, labels, batch.label_len, cfg.num_tokens, cfg.loss == "ctc")
    draft.train(was_training)
    return metrics
