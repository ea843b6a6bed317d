"""The training loop of an eagle1-layout draft (`train --preset reference`): the Trainer's optimiser,
schedule, batch plan, logging and checkpoints, with whole-sequence batches (reference_data.py) and
the reference losses (reference_losses.py) in place of sampled positions and label windows."""

from __future__ import annotations

import torch

from .data import HiddenReader, loader_workers
from .losses import ar_loss_weights
from .metrics import DraftMetrics
from .reference_data import FullBatch, MaskReader, full_batch, full_loader
from .reference_losses import draft_input, reference_losses
from .trainer import Trainer


class ReferenceTrainer(Trainer):
    def epoch_loader(self, epoch: int):
        workers = loader_workers(self.opts.loader_workers, self.acc.num_processes)
        return full_loader(self.epoch_batches(epoch), workers, pin_memory=self.acc.device.type == "cuda")

    def losses(self, model, batch: FullBatch, hidden: torch.Tensor):
        """The weighted reference losses of `batch`; noise on the draft's input only while `model` trains."""
        hidden = hidden.to(torch.promote_types(hidden.dtype, torch.float32))  # stored fp16: CPU autocast refuses it
        x = draft_input(hidden, batch.lengths, model.training, self.opts.input_noise)
        with self.acc.autocast():
            out = model(x, batch.next_ids)
            head = self.acc.unwrap_model(model)._head
            return reference_losses(out.features, out.logits, hidden, batch.trained, batch.lengths, head,
                                    ar_loss_weights(self.cfg))

    def train_step(self, batch: FullBatch, window: DraftMetrics, totals: DraftMetrics):
        batch = batch.to(self.acc.device)
        hidden = self.hidden_for(batch)
        self.model.train()
        lp = self.losses(self.model, batch, hidden)
        self.optimizer_step(lp)
        for m in (window, totals):
            m.add_loss(lp.parts, lp.num_positions)
        return lp

    @torch.no_grad()
    def evaluate(self) -> dict:
        """The losses and top-1 accuracy over every trained position of the held-out sequences, no noise."""
        model = self.acc.unwrap_model(self.model)
        mine = self.eval_seqs[self.acc.process_index:: self.acc.num_processes]
        masks, reader = MaskReader(), HiddenReader()
        metrics = DraftMetrics(self.cfg.label_len)
        was_training = model.training
        model.eval()
        for s in mine:
            batch = full_batch([s], masks, reader).to(self.acc.device)
            lp = self.losses(model, batch, self.hidden_for(batch))
            metrics.add_loss(lp.parts, lp.num_positions)
        model.train(was_training)
        return metrics.reduce(self.acc).summary()
