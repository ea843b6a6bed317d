"""`ctc-drafter train`: fit a CTC draft to a frozen base on distilled shards.

Runs as a plain command (one device) or under `accelerate launch` (DDP over GPUs/nodes; FSDP and
DeepSpeed configs pass through accelerate untouched). The base stays frozen and outside the
optimiser: it only supplies hidden states (when the shards do not store them) and its embedding and
LM head, which the draft borrows.

Output folder (--out CKPT):
    config.json, model.safetensors   the latest finished epoch's draft: `--draft-model CKPT` loads it
    epoch_N/                         the draft after epoch N (loadable the same way)
    state_N/                         accelerate state after epoch N (model, optimizer, scheduler, RNG)
                                     + trainer_state.json (epoch, step, data plan): `--recover N`
    log.jsonl                        one line per logging step and per epoch
    train_args.json                  the options of the run
Every folder is written under a temporary name and renamed when complete, and state_N is written
last, so an interrupted run never loses a finished epoch.

Batches: --bs sequences per process and step (the global batch is bs x processes). Each epoch
visits the training sequences in an order fixed by (seed, epoch), and each sequence trains up to
--positions positions fixed by (seed, epoch, sequence): a resumed run sees exactly the batches the
uninterrupted run would have.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

from ..cli import checks
from ..data.shards import check_shard_plan, plan_shards, read_manifest
from ..draft.config import ARCHITECTURES
from ..errors import CTCDrafterError, fault_reason, read_json_object, write_json_atomic, writing
from .data import (Batch, HiddenReader, TrainSequence, batch_loader, data_fingerprint, load_sequences,
                   loader_workers, make_batch, most_frequent_targets, split_eval)
from .losses import AR_LOSS_WEIGHTS, LOSSES, ar_losses, compute_losses, symbol_labels
from .metrics import DraftMetrics, batch_sums

LOG = "log.jsonl"
MAX_BATCH = 4096  # sequences per step: an epoch's batch plan is bs x steps indices
TRAINER_STATE = "trainer_state.json"


# ---- options -----------------------------------------------------------------------------------

def add_train_args(p) -> None:
    p.add_argument("--base-model", default="default",
                   help="local HF folder, a .gguf file, or 'default' (embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", action="append", required=True, metavar="DIR",
                   help="a folder written by `ctc-drafter distill` (repeat for several)")
    p.add_argument("--out", required=True, metavar="CKPT",
                   help="output folder; CKPT itself then loads as --draft-model (latest epoch)")
    p.add_argument("--config", default=None, metavar="JSON",
                   help="DraftConfig overrides as JSON, e.g. {\"num_context_layers\": 2} (a draft's config.json works)")
    p.add_argument("--epochs", type=checks.int_in(1, 100_000), default=2)
    p.add_argument("--bs", type=checks.int_in(1, MAX_BATCH), default=4,
                   help=f"sequences per process and step (1..{MAX_BATCH})")
    p.add_argument("--lr", type=checks.finite_float(0.0, low_open=True), default=3e-4,
                   help="peak learning rate (AdamW, warmup then cosine)")
    p.add_argument("--weight-decay", type=checks.finite_float(0.0), default=0.0)
    p.add_argument("--warmup", type=checks.finite_float(0.0), default=0.03,
                   help="warmup: a fraction of all steps (<1) or a step count")
    p.add_argument("--grad-clip", type=checks.finite_float(0.0), default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--loss", default=None, choices=LOSSES,
                   help="ctc (default), ce (Medusa-style heads, no blank) or ctc+ce")
    p.add_argument("--frames", type=int, default=None, help="L, draft frames (default 8; with --arch ar: levels, 4)")
    p.add_argument("--arch", default=None, choices=ARCHITECTURES,
                   help="nar: L frames from one state (default); ar: the reference code's EAGLE-style head "
                        "drafting level by level (trained with feature regression + token CE + weighted CTC)")
    for part, default in AR_LOSS_WEIGHTS.items():
        p.add_argument(f"--{part}-weight", type=checks.finite_float(0.0), default=None,
                       help=f"with --arch ar: weight of the {part} loss (default {default}"
                            f"{'; 0 trains an EAGLE-style head without a blank' if part == 'ctc' else ''})")
    p.add_argument("--label-len", type=int, default=None, help="k, tokens the frames are trained to emit (default 6)")
    p.add_argument("--positions", type=checks.int_in(1, 1 << 16), default=32,
                   help="P, positions trained per sequence and epoch")
    p.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                   help="propose from the N tokens most frequent in the training targets (0: the whole "
                        "vocabulary, the default); the frame head shrinks from V to N rows, lossless")
    p.add_argument("--max-len", type=int, default=2048, help="truncate sequences to this many tokens")
    p.add_argument("--recover", type=int, default=None, metavar="N", help="resume from CKPT/state_N")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if CKPT holds an earlier run")
    p.add_argument("--seed", type=checks.int_in(0, checks.MAX_SEED), default=0)
    p.add_argument("--eval-frac", type=checks.finite_float(0.0, 1.0), default=0.02,
                   help="fraction of sequences held out for evaluation")
    p.add_argument("--log-every", type=int, default=10, help="steps between log.jsonl lines")
    p.add_argument("--loader-workers", type=int, default=None, metavar="N",
                   help="DataLoader processes that read and pad the next batches during a step (0: in the "
                        "training process; default: 1 when a core is free)")
    p.add_argument("--device", default="auto", type=checks.device,
                   help="auto, cpu, cuda (several GPUs: accelerate launch)")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="train on a data folder whose distill run is unfinished or lacks shards (warns how much "
                        "is missing) instead of refusing")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow a base folder that ships its own Python code (auto_map) to run it")
    p.add_argument("--dtype", default="auto",
                   help="base dtype: auto (bf16 on GPUs and on CPUs with AMX/AVX512-BF16: the draft then trains "
                        "in bf16 autocast with fp32 weights; else fp32), float32, bfloat16, float16")


def _check_options(args) -> None:
    for name, low in (("epochs", 1), ("bs", 1), ("positions", 1), ("max_len", 2), ("log_every", 1)):
        if getattr(args, name) < low:
            raise CTCDrafterError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if not args.lr > 0:
        raise CTCDrafterError(f"--lr must be positive, got {args.lr}")
    if args.warmup < 0 or args.grad_clip < 0 or args.weight_decay < 0:
        raise CTCDrafterError("--warmup, --grad-clip and --weight-decay must be >= 0")
    if args.recover is not None and args.recover < 1:
        raise CTCDrafterError(f"--recover takes an epoch number >= 1, got {args.recover}")
    if not 0 <= args.eval_frac < 1:
        raise CTCDrafterError(f"--eval-frac must be in [0, 1), got {args.eval_frac}")
    for d in args.data:
        p = Path(d).expanduser()
        if not p.is_dir():
            raise CTCDrafterError(f"data folder not found: {d}")
        if not os.access(p, os.R_OK | os.X_OK):
            raise CTCDrafterError(f"data folder {d} is unreadable (permission denied)")
        # fail before loading the base when a folder is not (complete) distilled data
        check_shard_plan(plan_shards(p, read_manifest(p)), d, allow_incomplete=args.allow_incomplete)


def _config_overrides(args) -> tuple[dict, str]:
    """DraftConfig fields from --config, then --frames/--label-len/--loss on top."""
    from dataclasses import fields

    from ..draft.config import DraftConfig

    over: dict = {}
    if args.config:
        over = read_json_object(Path(args.config).expanduser(), "--config")
        over.pop("model_type", None)
        names = {f.name for f in fields(DraftConfig)}
        unknown = sorted(set(over) - names)
        if unknown:
            raise CTCDrafterError(f"--config has unknown draft fields: {', '.join(unknown)} (known: {', '.join(sorted(names))})")
        try:
            DraftConfig.check_field_types(over)
        except CTCDrafterError as e:
            raise CTCDrafterError(f"--config {args.config}: {e}") from e
        over.pop("base_model", None)  # always the base being trained on
    if args.frames is not None:
        over["num_frames"] = args.frames
    if args.draft_vocab is not None:
        over["draft_vocab"] = args.draft_vocab
    if args.label_len is not None:
        over["label_len"] = args.label_len
    kind = args.loss or ("ce" if over.get("loss") == "ce" else "ctc")
    over["loss"] = "ce" if kind == "ce" else "ctc"  # ctc+ce drafts still decode with CTC
    if args.arch is not None:
        over["architecture"] = args.arch
    if over.get("architecture") == "ar":
        kind = _ar_loss_weights(args, over)
    return over, kind


def _ar_loss_weights(args, over: dict) -> str:
    """--*-weight into the config (saved with the draft); CTC weight 0 (or --loss ce) is EAGLE-style:
    no blank symbol. Returns the loss kind ("ce" then, else "ctc")."""
    weights = dict((over.get("extra") or {}).get("ar_loss_weights", {}))
    for part in AR_LOSS_WEIGHTS:
        if getattr(args, f"{part}_weight", None) is not None:
            weights[part] = getattr(args, f"{part}_weight")
    if args.loss == "ce":
        weights["ctc"] = 0.0
    over["extra"] = {**(over.get("extra") or {}), "ar_loss_weights": {**AR_LOSS_WEIGHTS, **weights}}
    over["loss"] = "ce" if over["extra"]["ar_loss_weights"]["ctc"] == 0 else "ctc"
    return over["loss"]


def _precision(args, device: torch.device) -> tuple[torch.dtype, str]:
    """(base dtype, accelerate mixed precision). For auto: `accelerate launch --mixed_precision` decides, else
    bf16 on GPUs and on CPUs with native bf16 matmuls, else fp32."""
    from ..models.base import resolve_dtype

    env = os.environ.get("ACCELERATE_MIXED_PRECISION")  # set (always) by `accelerate launch`: it decides then
    if args.dtype in (None, "auto") and env is not None:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(env, torch.float32)
    else:
        # auto on a CPU with AMX / AVX512-BF16: bf16, whose autocast trained 1.3x faster than fp32 with the
        # same loss curve (BENCHMARKS.md)
        dtype = resolve_dtype(args.dtype, device)
    if dtype == torch.float16 and device.type == "cpu":
        raise CTCDrafterError("float16 training needs a GPU; on CPU use float32 or bfloat16")
    return dtype, {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


# ---- files -------------------------------------------------------------------------------------

def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place; an existing one is swapped out, never half-overwritten."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def export_draft(config, state_dict: dict, directory: Path) -> None:
    """Write a loadable draft folder atomically from a (possibly gathered) state dict."""
    from ..draft import draft_class

    model = draft_class(config)(config)
    model.load_state_dict({k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
                           for k, v in state_dict.items()})
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    _replace_dir(tmp, directory)


def publish_top_level(epoch_dir: Path, out: Path) -> None:
    """Make CKPT itself the latest draft: copy config + weights next to the run's folders, atomically each."""
    for name in ("config.json", "model.safetensors"):
        tmp = out / (name + ".tmp")
        shutil.copyfile(epoch_dir / name, tmp)
        os.replace(tmp, out / name)


def existing_states(out: Path) -> list[int]:
    return sorted(int(p.name.split("_", 1)[1]) for p in out.glob("state_*")
                  if p.is_dir() and p.name.split("_", 1)[1].isdigit())


def clear_run(out: Path) -> None:
    for p in list(out.glob("state_*")) + list(out.glob("epoch_*")) + [out / "tensorboard"]:
        if p.is_dir() and (p.name == "tensorboard" or p.name.split("_", 1)[1].split(".")[0].isdigit()):
            shutil.rmtree(p, ignore_errors=True)
    for name in (LOG, "config.json", "model.safetensors"):
        (out / name).unlink(missing_ok=True)


def truncate_log(path: Path, last_epoch: int) -> None:
    """Drop log lines from epochs after `last_epoch` (an interrupted epoch that is being redone)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("epoch", 0) <= last_epoch:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by the interruption
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(s + "\n" for s in keep))
    os.replace(tmp, path)


class RunLog:
    """log.jsonl (+ TensorBoard when installed), main process only."""

    def __init__(self, out: Path, enabled: bool):
        self.enabled = enabled
        self.path = out / LOG
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tensorboard"))
            except Exception:  # noqa: BLE001 - tensorboard missing or broken: the JSON log is enough
                self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            prefix = record["event"]
            for split in ("", "train", "eval"):
                vals = record if not split else record.get(split) or {}
                for key, v in vals.items():
                    tag = f"{prefix}/{split + '_' if split else ''}{key}"
                    if isinstance(v, (int, float)) and key not in ("epoch", "step"):
                        self.tb.add_scalar(tag, v, record["step"])
                    elif key == "acc" and isinstance(v, list):
                        for j, a in enumerate(v):
                            if a is not None:
                                self.tb.add_scalar(f"{tag}_{j + 1}", a, record["step"])
            self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()


# ---- the trainer -------------------------------------------------------------------------------

class Trainer:
    def __init__(self, args, accelerator, base, draft, kind: str, train_seqs: list[TrainSequence],
                 eval_seqs: list[TrainSequence], fingerprint: str, out: Path):
        self.args, self.acc, self.base, self.kind = args, accelerator, base, kind
        self.cfg = draft.config
        self.train_seqs, self.eval_seqs = train_seqs, eval_seqs
        self.fingerprint, self.out = fingerprint, out
        self.reader = HiddenReader()
        W = accelerator.num_processes
        self.steps_per_epoch = math.ceil(len(train_seqs) / (args.bs * W))
        self.total_steps = self.steps_per_epoch * args.epochs
        warmup = int(args.warmup * self.total_steps) if args.warmup < 1 else int(args.warmup)
        ds = getattr(accelerator.state, "deepspeed_plugin", None)
        if ds is not None and ds.deepspeed_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            # DeepSpeed reads the micro batch from a prepared DataLoader; this loop batches by itself
            ds.deepspeed_config["train_micro_batch_size_per_gpu"] = args.bs
        params = [p for p in draft.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(warmup, self.total_steps))
        self.model, self.optimizer, self.scheduler = accelerator.prepare(draft, optimizer, scheduler)
        self.global_step = 0
        self.start_epoch = 1
        self.last_lr = args.lr
        self.log = RunLog(out, accelerator.is_main_process)

    @property
    def token_to_symbol(self):
        # recomputed per step (a V-sized index): --recover may have replaced the proposal vocabulary
        return self.acc.unwrap_model(self.model).token_to_symbol()

    # -- data plan --

    def epoch_batches(self, epoch: int) -> list[list[TrainSequence]]:
        """This process's batches for `epoch` (every process gets the same number)."""
        bs, W, r = self.args.bs, self.acc.num_processes, self.acc.process_index
        n = len(self.train_seqs)
        g = torch.Generator().manual_seed(self.args.seed * 1_000_003 + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        need = self.steps_per_epoch * bs * W
        order = (perm * math.ceil(need / n))[:need]  # wrap around so the last global batch is full
        per = bs * W
        return [[self.train_seqs[i] for i in order[s * per + r * bs: s * per + (r + 1) * bs]]
                for s in range(self.steps_per_epoch)]

    def epoch_loader(self, epoch: int):
        """This process's batches for `epoch`, read and padded ahead of the step by DataLoader workers."""
        workers = loader_workers(getattr(self.args, "loader_workers", None), self.acc.num_processes)
        return batch_loader(self.epoch_batches(epoch), self.cfg.label_len, self.args.positions, self.args.seed,
                            epoch, workers, pin_memory=self.acc.device.type == "cuda")

    def hidden_for(self, batch) -> torch.Tensor:
        """Stored hidden states when every sequence has them, else one frozen base pass (no grad)."""
        if batch.hidden is not None:
            return batch.hidden
        hidden, _ = self.base.forward(batch.input_ids, None, logits_at=slice(0, 0))
        return hidden

    # -- steps --

    def train_step(self, batch: Batch, window: DraftMetrics, totals: DraftMetrics):
        batch = batch.to(self.acc.device)
        hidden = self.hidden_for(batch)
        self.model.train()
        out = self.model(hidden, batch.next_ids, batch.positions)  # [B,P,L,V+1] (AR: + features)
        labels, loss_len = symbol_labels(batch.labels, batch.label_len, self.token_to_symbol)
        lp, logits = draft_losses(out, hidden, batch.positions, labels.clamp(min=0), loss_len, self.kind, self.cfg)
        self.acc.backward(lp.total)
        if self.args.grad_clip > 0 and self.acc.sync_gradients:
            self.acc.clip_grad_norm_(self.model.parameters(), self.args.grad_clip)
        self.optimizer.step()
        self.last_lr = self.scheduler.get_last_lr()[0]  # the rate this step used
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        # greedy-decode sums stay on the device; the host reads them only for a log line
        sums = batch_sums(logits.detach(), labels, batch.label_len, self.cfg.num_tokens, self.cfg.loss == "ctc")
        for m in (window, totals):
            m.add_loss(lp.parts, lp.num_positions)
            m.add_sums(sums)
        return lp

    def run_epoch(self, epoch: int) -> dict:
        from tqdm.auto import tqdm

        k = self.cfg.label_len
        totals, window = DraftMetrics(k), DraftMetrics(k)
        t0 = time.perf_counter()
        t_win, seqs_win = t0, 0
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch}/{self.args.epochs}", unit="step",
                   disable=not self.acc.is_main_process, dynamic_ncols=True, file=sys.stderr)
        for batch in self.epoch_loader(epoch):
            lp = self.train_step(batch, window, totals)
            seqs_win += batch.num_sequences
            bar.update(1)
            bar.set_postfix(loss=f"{lp.parts['loss']:.3f}", lr=f"{self.last_lr:.2e}")
            if self.global_step % self.args.log_every == 0:
                summary = window.reduce(self.acc).summary()
                now = time.perf_counter()
                self.log.write({"event": "step", "epoch": epoch, "step": self.global_step,
                                "lr": self.last_lr, **summary,
                                "seq_per_s": round(seqs_win * self.acc.num_processes / (now - t_win), 3)})
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
            m = evaluate_draft(model, self.base, mine, self.kind, positions=max(self.args.positions, 64),
                               hidden_fn=self.hidden_for, reader=self.reader)
        return m.reduce(self.acc).summary()

    # -- checkpoints --

    def trainer_state(self, epoch: int) -> dict:
        return {"epoch": epoch, "global_step": self.global_step, "steps_per_epoch": self.steps_per_epoch,
                "epochs": self.args.epochs, "bs": self.args.bs, "num_processes": self.acc.num_processes,
                "positions": self.args.positions, "seed": self.args.seed, "loss": self.kind,
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
            _replace_dir(tmp, out / f"state_{epoch}")
        acc.wait_for_everyone()

    def resume(self, n: int) -> None:
        state_dir = self.out / f"state_{n}"
        try:
            saved = json.loads((state_dir / TRAINER_STATE).read_text())
            saved["draft_config"], saved["global_step"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CTCDrafterError(f"{state_dir / TRAINER_STATE} is unreadable or incomplete: {e}") from e
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
            print(f"ctc-drafter: warning: resuming with different {', '.join(changed)} than state_{n}; "
                  "the result will differ from an uninterrupted run", file=sys.stderr)
        state_dict = self.acc.get_state_dict(self.model)  # a collective under FSDP / DeepSpeed
        if self.acc.is_main_process:
            truncate_log(self.out / LOG, n)
            if not (self.out / f"epoch_{n}" / "model.safetensors").is_file():  # interrupted before export
                export_draft(self.cfg, state_dict, self.out / f"epoch_{n}")
            publish_top_level(self.out / f"epoch_{n}", self.out)
        self.acc.wait_for_everyone()

    def fit(self) -> list[dict]:
        records = []
        for epoch in range(self.start_epoch, self.args.epochs + 1):
            records.append(self.run_epoch(epoch))
            self.save_epoch(epoch)
        self.log.close()
        return records


def draft_losses(out, hidden, positions, labels, loss_len, kind: str, config):
    """Either architecture's training loss -> (LossParts, the frame logits [B,P,L,N+1] for metrics)."""
    if isinstance(out, tuple):  # ARTrainOutput: frames + features
        return ar_losses(out, hidden, positions, labels, loss_len, config), out.frames
    return compute_losses(out, labels, loss_len, kind, config.num_tokens), out


def _warmup_cosine(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


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


# ---- entry point -------------------------------------------------------------------------------

def _raise_if_output_fault(e: Exception, out: Path) -> None:
    """A full or read-only --out mid-run: one line naming the folder, the reason and what is kept."""
    reason = fault_reason(e)
    if reason is None:
        return
    name = getattr(e, "filename", None)
    done = existing_states(out) if out.is_dir() else []
    kept = (f"epochs 1..{done[-1]} are kept (resume with --recover {done[-1]})" if done
            else "no epoch had finished")
    raise CTCDrafterError(f"cannot write the training run in {out}{f' ({name})' if name else ''}: {reason}; "
                          f"{kept}") from e


def run_training(args) -> int:
    """The whole command: check inputs, load, (resume,) train, save. Returns an exit code."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import set_seed

    from ..draft import new_ar_draft_for, new_draft_for
    from ..models.base import load_base_model, resolve_device

    _check_options(args)
    # under autocast RMSNorm sees bf16 activations with fp32 weights and says so on every run: expected
    warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise CTCDrafterError(f"--out {args.out} exists and is not a folder")
    if args.recover is not None:
        have = existing_states(out) if out.is_dir() else []
        if args.recover not in have or not (out / f"state_{args.recover}" / TRAINER_STATE).is_file():
            found = ", ".join(f"state_{n}" for n in have) or "none"
            raise CTCDrafterError(f"cannot recover: {out / f'state_{args.recover}'} does not exist (found: {found})")
    elif out.is_dir() and existing_states(out) and not args.overwrite:
        raise CTCDrafterError(f"{out} already holds a training run (state_{existing_states(out)[-1]}); "
                              "resume it with --recover N, or pass --overwrite or another --out")
    overrides, kind = _config_overrides(args)

    device = resolve_device(args.device)
    base_dtype, mixed = _precision(args, device)
    if PartialState._shared_state and not torch.distributed.is_initialized():
        # a single-process state left by earlier in-process work (another command, a test) may have
        # another device or precision; this command sets its own
        AcceleratorState._reset_state(reset_partial_state=True)
    fresh_state = not PartialState._shared_state  # we own accelerate's global state: reset it when done
    acc = Accelerator(cpu=device.type == "cpu", mixed_precision=mixed, step_scheduler_with_optimizer=False)
    try:
        set_seed(args.seed)
        base = load_base_model(args.base_model, device=acc.device, dtype=base_dtype,
                               trust_remote_code=args.trust_remote_code)
        for key in ("hidden_size", "vocab_size"):  # a config.json of a draft for another base
            if key in overrides and overrides[key] != int(getattr(base.config, key)):
                raise CTCDrafterError(f"--config {args.config} has {key} {overrides[key]}, but base {base.name} has "
                                      f"{getattr(base.config, key)}; it is a config for another base")
        new = new_ar_draft_for if overrides.get("architecture") == "ar" else new_draft_for
        draft = new(base, seed=args.seed, **overrides)
        # fp32 master weights (fp64 only next to an fp64 base); bf16/fp16 come from autocast
        draft = draft.to(torch.float64 if base_dtype == torch.float64 else torch.float32)
        if kind == "ce":
            draft.blank_head.requires_grad_(False)  # unused without a blank; DDP must not wait for its grad
        max_len = min(args.max_len, base.max_length)
        seqs, summaries = load_sequences(args.data, base, draft.config.label_len, max_len, args.allow_incomplete)
        train_seqs, eval_seqs = split_eval(seqs, args.eval_frac, args.seed)
        if draft.config.draft_vocab:  # from the training split only; --recover restores the saved list
            draft.set_vocab(most_frequent_targets(train_seqs, draft.config.draft_vocab))
        trainer = Trainer(args, acc, base, draft, kind, train_seqs, eval_seqs, data_fingerprint(seqs), out)
        if acc.is_main_process:
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise CTCDrafterError(f"cannot create --out {args.out}: {e.strerror}") from e
            if args.recover is None:
                clear_run(out)  # --overwrite: no stale epochs, states or log lines of the earlier run
            with writing(out / "train_args.json"):
                write_json_atomic(out / "train_args.json", {**vars(args), "func": None, "loss_kind": kind,
                                                       "data_summary": summaries, "train_sequences": len(train_seqs),
                                                       "eval_sequences": len(eval_seqs),
                                                       "num_processes": acc.num_processes, "mixed_precision": mixed})
            arch = " AR" if draft.config.architecture == "ar" else ""
            print(f"ctc-drafter: training a {kind}{arch} draft ({sum(p.numel() for p in draft.parameters()) / 1e6:.1f}M "
                  f"params) on {len(train_seqs)} sequences ({len(eval_seqs)} held out), {trainer.steps_per_epoch} "
                  f"steps/epoch x {args.epochs} epochs, {acc.num_processes} process(es), {acc.device}, "
                  f"mixed precision {mixed}", file=sys.stderr)
        acc.wait_for_everyone()
        if args.recover is not None:
            trainer.resume(args.recover)
            if trainer.start_epoch > args.epochs and acc.is_main_process:
                print(f"ctc-drafter: state_{args.recover} already has all {args.epochs} epochs; nothing to train",
                      file=sys.stderr)
        try:
            records = trainer.fit()
        except Exception as e:  # noqa: BLE001 - only file-system faults are converted
            _raise_if_output_fault(e, out)
            raise
        if acc.is_main_process and records:
            last = records[-1]
            print(f"ctc-drafter: done; draft in {out} (epoch {last['epoch']}), est. accept length "
                  f"{last['est_accept_len']}", file=sys.stderr)
    finally:
        if fresh_state and acc.num_processes == 1:
            AcceleratorState._reset_state(reset_partial_state=True)
    return 0
