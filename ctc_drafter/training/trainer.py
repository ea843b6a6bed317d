"""The training loop: the optimiser and schedule, each epoch's batch plan (fixed by seed and epoch,
so a resumed run sees the batches the uninterrupted one would), the step, logging, held-out
evaluation, and saving / resuming epochs through accelerate."""

from __future__ import annotations

import logging

import math
import shutil
import sys
import time
from pathlib import Path

import torch

from ..errors import CTCDrafterError, write_json_atomic
from .checkpoints import TRAINER_STATE, export_draft, publish_top_level, read_trainer_state, replace_dir
from .data import Batch, HiddenReader, TrainSequence, batch_loader, loader_workers
from .evaluate import batch_losses, evaluate_draft
from .metrics import DraftMetrics
from .options import TrainOptions
from .run_log import LOG, RunLog, truncate_log

log = logging.getLogger(__name__)


def _warmup_cosine(warmup: int, total: int):
    """The learning-rate factor at each step: linear warmup, then cosine to 0 (held there past `total`).

    Not transformers' get_cosine_schedule_with_warmup: its warmup starts at factor 0 (step 0 trains
    with lr 0) where this one starts at 1/(warmup+1); after warmup the two agree. Switching would
    change every run's first steps, and resumed runs against their saved schedulers."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


class Trainer:
    def __init__(self, opts: TrainOptions, accelerator, base, draft, kind: str, train_seqs: list[TrainSequence],
                 eval_seqs: list[TrainSequence], fingerprint: str, out: Path):
        self.opts, self.acc, self.base, self.kind = opts, accelerator, base, kind
        self.cfg = draft.config
        self.train_seqs, self.eval_seqs = train_seqs, eval_seqs
        self.fingerprint, self.out = fingerprint, out
        self.reader = HiddenReader()
        W = accelerator.num_processes
        self.steps_per_epoch = math.ceil(len(train_seqs) / (opts.bs * W))
        self.total_steps = self.steps_per_epoch * (opts.epochs - opts.first_epoch + 1)
        warmup = int(opts.warmup * self.total_steps) if opts.warmup < 1 else int(opts.warmup)
        ds = getattr(accelerator.state, "deepspeed_plugin", None)
        if ds is not None and ds.deepspeed_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            # DeepSpeed reads the micro batch from a prepared DataLoader; this loop batches by itself
            ds.deepspeed_config["train_micro_batch_size_per_gpu"] = opts.bs
        params = [p for p in draft.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay, betas=(0.9, 0.95))
        if opts.lr_schedule == "linear":  # the reference recipe's: transformers' own, warmup from lr 0
            from transformers import get_linear_schedule_with_warmup

            scheduler = get_linear_schedule_with_warmup(optimizer, warmup, opts.schedule_steps or self.total_steps)
        else:
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, _warmup_cosine(warmup, opts.schedule_steps or self.total_steps))
        self.model, self.optimizer, self.scheduler = accelerator.prepare(draft, optimizer, scheduler)
        self.global_step = 0
        self.start_epoch = opts.first_epoch
        self.last_lr = opts.lr
        self.log = RunLog(out, accelerator.is_main_process)

    @property
    def token_to_symbol(self):
        # recomputed per step (a V-sized index): --recover may have replaced the proposal vocabulary
        return self.acc.unwrap_model(self.model).token_to_symbol()

    # -- data plan --

    def epoch_batches(self, epoch: int) -> list[list[TrainSequence]]:
        """This process's batches for `epoch` (every process gets the same number)."""
        bs, W, r = self.opts.bs, self.acc.num_processes, self.acc.process_index
        n = len(self.train_seqs)
        g = torch.Generator().manual_seed(self.opts.seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        need = self.steps_per_epoch * bs * W
        order = (perm * math.ceil(need / n))[:need]  # wrap around so the last global batch is full
        per = bs * W
        return [[self.train_seqs[i] for i in order[s * per + r * bs: s * per + (r + 1) * bs]]
                for s in range(self.steps_per_epoch)]

    def epoch_loader(self, epoch: int):
        """This process's batches for `epoch`, read and padded ahead of the step by DataLoader workers."""
        workers = loader_workers(self.opts.loader_workers, self.acc.num_processes)
        return batch_loader(self.epoch_batches(epoch), self.cfg.label_len, self.max_positions, self.opts.seed,
                            epoch, workers, pin_memory=self.acc.device.type == "cuda")

    @property
    def max_positions(self) -> int | None:
        """Positions sampled per sequence, or None: every position (`--positions all`)."""
        return None if self.opts.positions == "all" else self.opts.positions

    def hidden_for(self, batch) -> torch.Tensor:
        """Stored hidden states when every sequence has them, else one frozen base pass (no grad); for the
        eagle3 layout always that pass, returning its aux layers' states [B,T,A*d] (its sequences are loaded
        without stored states: shards store the last layer only)."""
        if self.cfg.layout == "eagle3":
            with self.base.layer_inputs(self.cfg.aux_layers) as aux:
                self.base.forward(batch.input_ids, None, logits_at=slice(0, 0))
            return aux[-1]
        if batch.hidden is not None:
            return batch.hidden
        hidden, _ = self.base.forward(batch.input_ids, None, logits_at=slice(0, 0))
        return hidden

    # -- steps --

    def train_step(self, batch: Batch, window: DraftMetrics, totals: DraftMetrics):
        batch = batch.to(self.acc.device)
        hidden = self.hidden_for(batch)
        self.model.train()
        lp, sums = batch_losses(self.model, hidden, batch, self.token_to_symbol, self.kind, self.cfg)
        self.optimizer_step(lp)
        # greedy-decode sums stay on the device; the host reads them only for a log line
        for m in (window, totals):
            m.add_loss(lp.parts, lp.num_positions)
            m.add_sums(sums)
        return lp

    def optimizer_step(self, lp) -> None:
        """backward through lp.total, clip, one optimiser and schedule step."""
        self.acc.backward(lp.total)
        self.clip_gradients()
        self.optimizer.step()
        self.last_lr = self.scheduler.get_last_lr()[0]  # the rate this step used
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1

    def clip_gradients(self) -> None:
        """--grad-clip on the gradient's norm, or (--clip value) on each element."""
        if self.opts.grad_clip > 0 and self.acc.sync_gradients:
            if self.opts.clip == "value":
                self.acc.clip_grad_value_(self.model.parameters(), self.opts.grad_clip)
            else:
                self.acc.clip_grad_norm_(self.model.parameters(), self.opts.grad_clip)

    def run_epoch(self, epoch: int) -> dict:
        from tqdm.auto import tqdm

        k = self.cfg.label_len
        totals, window = DraftMetrics(k), DraftMetrics(k)
        t0 = time.perf_counter()
        t_win, seqs_win = t0, 0
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch}/{self.opts.epochs}", unit="step",
                   disable=not self.acc.is_main_process, dynamic_ncols=True, file=sys.stderr)
        for batch in self.epoch_loader(epoch):
            lp = self.train_step(batch, window, totals)
            seqs_win += batch.num_sequences
            bar.update(1)
            bar.set_postfix(loss=f"{lp.parts['loss']:.3f}", lr=f"{self.last_lr:.2e}")
            if self.global_step % self.opts.log_every == 0:
                reduced = window.reduce(self.acc)
                summary = reduced.summary()
                now = time.perf_counter()
                self.log.write({"event": "step", "epoch": epoch, "step": self.global_step,
                                "lr": self.last_lr, **summary,
                                "seq_per_s": round(seqs_win * self.acc.num_processes / (now - t_win), 3),
                                # trained positions (every process's): what --positions all multiplies
                                # (the reference trainer keeps no decode sums: its losses' weight is its positions)
                                "pos_per_s": round(summary.get("positions", reduced.loss_weight) / (now - t_win), 1)})
                window, t_win, seqs_win = DraftMetrics(k), now, 0
        bar.close()
        train = totals.reduce(self.acc).summary()
        train_s = time.perf_counter() - t0
        ev = self.evaluate() if self.eval_seqs else None
        record = {"event": "epoch", "epoch": epoch, "step": self.global_step, "train": train, "eval": ev,
                  "est_accept_len": ev.get("est_accept_len") if ev else None,
                  "train_s": round(train_s, 2), "s_per_seq": round(train_s / max(1, len(self.train_seqs)), 4)}
        self.log.write(record)
        return record

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Every trainable position of the held-out sequences (split over processes), then summed."""
        model = self.acc.unwrap_model(self.model)
        mine = self.eval_seqs[self.acc.process_index:: self.acc.num_processes]
        with self.acc.autocast():
            m = evaluate_draft(model, self.base, mine, self.kind, positions=max(self.max_positions or 0, 64),
                               hidden_fn=self.hidden_for, reader=self.reader)
        return m.reduce(self.acc).summary()

    # -- checkpoints --

    def trainer_state(self, epoch: int) -> dict:
        return {"epoch": epoch, "global_step": self.global_step, "steps_per_epoch": self.steps_per_epoch,
                "epochs": self.opts.epochs, "bs": self.opts.bs, "num_processes": self.acc.num_processes,
                "positions": self.opts.positions, "seed": self.opts.seed, "loss": self.kind,
                "data_fingerprint": self.fingerprint, "draft_config": self.cfg.to_dict()}

    def save_epoch(self, epoch: int) -> None:
        """epoch_N, then the top-level draft, then state_N last: state_N existing means all of it is done."""
        acc, out = self.acc, self.out
        state_dict = acc.get_state_dict(self.model)  # a collective under FSDP / DeepSpeed
        tmp = out / f"state_{epoch}.tmp"
        if acc.is_main_process:
            export_draft(self.cfg, state_dict, out / f"epoch_{epoch}")
            publish_top_level(out / f"epoch_{epoch}", out)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            write_json_atomic(tmp / TRAINER_STATE, self.trainer_state(epoch))
            replace_dir(tmp, out / f"state_{epoch}")
        acc.wait_for_everyone()

    def resume(self, n: int) -> None:
        state_dir = self.out / f"state_{n}"
        saved = read_trainer_state(state_dir)
        if saved["draft_config"] != self.cfg.to_dict():
            diff = sorted(k for k in saved["draft_config"] if saved["draft_config"].get(k) != self.cfg.to_dict().get(k))
            raise CTCDrafterError(f"state_{n} was trained with another draft config ({', '.join(diff)} differ); "
                                  "pass the same --config/--frames/--label-len/--loss/--base-model")
        self.acc.load_state(str(state_dir))
        self.global_step = int(saved["global_step"])
        self.start_epoch = n + 1
        changed = [k for k in ("steps_per_epoch", "epochs", "bs", "num_processes", "positions", "seed", "loss",
                               "data_fingerprint") if saved.get(k) != self.trainer_state(n).get(k)]
        if changed and self.acc.is_main_process:
            log.warning("resuming with different %s than state_%d; the result will differ from an uninterrupted run",
                        ", ".join(changed), n)
        state_dict = self.acc.get_state_dict(self.model)  # a collective under FSDP / DeepSpeed
        if self.acc.is_main_process:
            truncate_log(self.out / LOG, n)
            if not (self.out / f"epoch_{n}" / "model.safetensors").is_file():  # interrupted before export
                export_draft(self.cfg, state_dict, self.out / f"epoch_{n}")
            publish_top_level(self.out / f"epoch_{n}", self.out)
        self.acc.wait_for_everyone()

    def fit(self) -> list[dict]:
        records = []
        for epoch in range(self.start_epoch, self.opts.epochs + 1):
            records.append(self.run_epoch(epoch))
            self.save_epoch(epoch)
        self.log.close()
        return records
