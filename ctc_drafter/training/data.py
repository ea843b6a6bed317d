"""Training data: distilled shards -> batches of (hidden, next ids, trained positions, CTC label windows).

For a sequence of T tokens with base targets y (y[t] = the base's greedy token after position t) and
loss mask m (m[t] = 1 where token t+1 is an assistant token), a position t trains when m[t] = 1 and
at least one label follows it:

    draft input at t:   hidden h_t, next id y[t]                  (x_{t+1}: the base's token there)
    CTC labels of t:    y[t+1], ..., y[t+k]                        (x_{t+2} .. x_{t+k+1})

The label window stops early at the end of the sequence and at the first position whose next token
is not an assistant token (m[t+j] = 0: the turn ended), so its length varies from 1 to k.

Token arrays are read eagerly (small); stored hidden states are sliced lazily from the memory-mapped
shard files, so a data folder with --save-hidden need not fit in RAM. During training a DataLoader
(`batch_loader`) samples positions, reads hidden states and pads the next batches in a worker process
while the current step computes. A batch either trains sampled positions (positions [B,P], windows
[B,P,k]) or every position of its sequences (positions None, windows [B,T,k]: the AR draft's one pass).
"""

from __future__ import annotations

import hashlib
import json
import os
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from ..data.shards import check_manifest_matches, check_shard_plan, plan_shards, read_manifest
from ..errors import CTCDrafterError

log = logging.getLogger(__name__)


@dataclass
class TrainSequence:
    uid: int  # stable index over all data folders, in load order (seeds its position sampling)
    input_ids: torch.Tensor  # [T] long
    targets: torch.Tensor  # [T] long
    label_len: torch.Tensor  # [T] int8: CTC label window length at each position (0 = does not train)
    shard: Path
    span: tuple[int, int]  # token range inside the shard (for its stored hidden states)
    has_hidden: bool

    @property
    def num_positions(self) -> int:
        return int((self.label_len > 0).sum())


def label_window_lengths(loss_mask: torch.Tensor, k: int) -> torch.Tensor:
    """loss_mask [T] bool -> [T] int8: number of labels y[t+1..t+j] (j <= k) inside the assistant turn.

    0 where t itself does not train (m[t] = 0) or where no label follows it.
    """
    T = loss_mask.numel()
    m = loss_mask.bool()
    ok = m.clone()  # ok_j[t] = m[t] and m[t+1] .. m[t+j] all set
    n = torch.zeros(T, dtype=torch.int8)
    for j in range(1, k + 1):
        nxt = torch.zeros(T, dtype=torch.bool)
        nxt[: T - j] = m[j:]
        ok &= nxt
        n += ok.to(torch.int8)
    return n


def _read_token_arrays(path: Path):
    """The small arrays of one shard (no hidden states), with clear errors for broken files."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
            missing = {"input_ids", "targets", "loss_mask", "offsets"} - keys
            if missing:
                raise CTCDrafterError(f"shard {path} is not a distilled shard (missing {', '.join(sorted(missing))})")
            arrays = {k: f.get_tensor(k) for k in ("input_ids", "targets", "loss_mask", "offsets")}
            hidden_dim = f.get_slice("hidden").get_shape()[-1] if "hidden" in keys else None
    except CTCDrafterError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types for corrupt files
        raise CTCDrafterError(f"shard {path} is unreadable: {e}") from e
    return arrays, hidden_dim


def load_sequences(data_dirs: list[str], base, label_len: int, max_len: int,
                   allow_incomplete: bool = False) -> tuple[list[TrainSequence], list[dict]]:
    """Every sequence with at least one trainable position, from every data folder (in order).

    Checks each folder's manifest against `base`, and refuses a folder with shards missing or an
    unfinished run unless `allow_incomplete` (then warns). Returns (sequences, per-folder summaries).
    """
    seqs: list[TrainSequence] = []
    summaries = []
    vocab, d = int(base.config.vocab_size), int(base.config.hidden_size)
    uid = 0
    for name in data_dirs:
        directory = Path(name).expanduser()
        if not directory.is_dir():
            raise CTCDrafterError(f"data folder not found: {name}")
        try:
            manifest = read_manifest(directory)
        except PermissionError as e:
            raise CTCDrafterError(f"data folder {name} is unreadable: {e.strerror}") from e
        check_manifest_matches(manifest, base)
        plan = plan_shards(directory, manifest)
        warning = check_shard_plan(plan, name, allow_incomplete)
        if warning:
            log.warning("%s", warning)
        shards = plan.files
        n_seq = n_pos = 0
        for shard in shards:
            arrays, hidden_dim = _read_token_arrays(shard)
            if hidden_dim is not None and hidden_dim != d:
                raise CTCDrafterError(f"shard {shard} stores hidden size {hidden_dim}, the base has {d}")
            ids, tgt = arrays["input_ids"].long(), arrays["targets"].long()
            if ids.numel() and (int(ids.max()) >= vocab or int(tgt.max()) >= vocab or int(ids.min()) < 0):
                raise CTCDrafterError(f"shard {shard} has token ids outside the base vocabulary ({vocab})")
            off = arrays["offsets"].tolist()
            mask = arrays["loss_mask"].bool()
            for a, b in zip(off[:-1], off[1:]):
                b = min(b, a + max_len)  # truncate long sequences; windows then end at the cut
                lens = label_window_lengths(mask[a:b], label_len)
                n_seq += 1
                if int((lens > 0).sum()) == 0:
                    uid += 1
                    continue
                seqs.append(TrainSequence(uid, ids[a:b], tgt[a:b], lens, shard, (a, b), hidden_dim is not None))
                n_pos += seqs[-1].num_positions
                uid += 1
        summaries.append({"data": str(directory), "shards": len(shards), "sequences": n_seq, "positions": n_pos,
                          "shards_expected": plan.expected, "complete": plan.problem(name) is None})
    if not seqs:
        where = ", ".join(data_dirs)
        raise CTCDrafterError(f"no trainable positions in {where}: no sequence has an assistant token with a "
                              "next token to predict (empty dataset?)")
    return seqs, summaries


def data_fingerprint(seqs: list[TrainSequence]) -> str:
    """Identifies the training data (which sequences, how long) so --recover can refuse other data."""
    h = hashlib.sha256()
    h.update(json.dumps([[s.uid, len(s.input_ids), s.num_positions] for s in seqs]).encode())
    return h.hexdigest()[:16]


def split_eval(seqs: list[TrainSequence], eval_frac: float, seed: int):
    """Deterministic held-out split by sequence: (train, eval)."""
    if not 0 <= eval_frac < 1:
        raise CTCDrafterError(f"--eval-frac must be in [0, 1), got {eval_frac}")
    n = len(seqs)
    n_eval = int(round(eval_frac * n))
    if eval_frac > 0 and n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)
    else:
        n_eval = 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(perm[:n_eval])
    return [s for i, s in enumerate(seqs) if i not in held], [s for i, s in enumerate(seqs) if i in held]


def most_frequent_targets(seqs: list[TrainSequence], n: int) -> torch.Tensor:
    """The n base tokens that most often follow a trained position (ties: lower id), sorted by id."""
    vocab = max(int(s.targets.max()) for s in seqs) + 1
    counts = torch.zeros(max(vocab, n), dtype=torch.long)
    for s in seqs:
        counts += torch.bincount(s.targets[s.label_len > 0], minlength=counts.numel())
    order = torch.sort(-counts, stable=True).indices  # stable: equal counts keep id order
    return order[:n].sort().values


def sample_positions(seq: TrainSequence, max_positions: int, seed: int, epoch: int) -> torch.Tensor:
    """Up to P trainable positions of `seq`, sorted; the same (seed, epoch, sequence) gives the same ones."""
    valid = torch.nonzero(seq.label_len > 0).flatten()
    if valid.numel() <= max_positions:
        return valid
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7_919 + seq.uid * 104_729) % (2**63 - 1))
    pick = torch.randperm(valid.numel(), generator=g)[:max_positions]
    return valid[pick].sort().values


class HiddenReader:
    """Lazy reads of stored hidden states: one memory-mapped handle per shard, opened on first use."""

    def __init__(self):
        self._open = {}

    def get(self, seq: TrainSequence) -> torch.Tensor:  # -> [T, d] float16
        from safetensors import safe_open

        f = self._open.get(seq.shard)
        if f is None:
            f = self._open[seq.shard] = safe_open(str(seq.shard), "pt")
        a, b = seq.span
        return f.get_slice("hidden")[a:b]


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B,T] long (right-padded with 0)
    next_ids: torch.Tensor  # [B,T] long: the base's token at t (x_{t+1})
    hidden: torch.Tensor | None  # [B,T,d] stored hidden states, or None (compute with the base)
    positions: torch.Tensor | None  # [B,P] long: trained positions (padding: 0); None: every position t < T
    labels: torch.Tensor  # [B,P,k] long: CTC label windows (padding: 0); [B,T,k] when positions is None
    label_len: torch.Tensor  # [B,P] long: window lengths (0 = padding or untrained); [B,T] when positions is None
    num_sequences: int

    def _map(self, fn) -> "Batch":
        mv = lambda x: None if x is None else fn(x)  # noqa: E731
        return Batch(mv(self.input_ids), mv(self.next_ids), mv(self.hidden), mv(self.positions), mv(self.labels),
                     mv(self.label_len), self.num_sequences)

    def to(self, device) -> "Batch":
        # non_blocking only overlaps the copy when the batch is pinned (the DataLoader pins it on CUDA)
        return self._map(lambda x: x.to(device, non_blocking=True))

    def pin_memory(self) -> "Batch":  # the DataLoader's pin_memory thread calls this
        return self._map(lambda x: x.pin_memory())


@dataclass
class Example:
    """One sequence of a batch, ready to pad: its sampled positions and (when stored) its hidden states."""
    seq: TrainSequence
    positions: torch.Tensor | None  # [p] long, sorted; None: every position
    hidden: torch.Tensor | None  # [T,d] read from the shard, or None


def collate(examples: list[Example], k: int) -> Batch:
    """Pad examples into one batch; labels y[t+1 .. t+len]. Hidden states only when every example has them.
    Examples without positions (all or none of them) give a batch of every position (positions None)."""
    B = len(examples)
    T = max(len(e.seq.input_ids) for e in examples)
    dense = all(e.positions is None for e in examples)
    if dense:  # every position: the windows of t = 0..n-1 ([B,T,k]), untrained ones of length 0
        examples = [Example(e.seq, torch.arange(len(e.seq.input_ids)), e.hidden) for e in examples]
    P = T if dense else max(1, max(e.positions.numel() for e in examples))
    ids = torch.zeros(B, T, dtype=torch.long)
    nxt = torch.zeros(B, T, dtype=torch.long)
    pos = torch.zeros(B, P, dtype=torch.long)
    labels = torch.zeros(B, P, k, dtype=torch.long)
    lens = torch.zeros(B, P, dtype=torch.long)
    hidden = None
    if all(e.hidden is not None for e in examples):
        hidden = torch.zeros(B, T, examples[0].hidden.shape[-1], dtype=examples[0].hidden.dtype)
    for b, e in enumerate(examples):
        s, p = e.seq, e.positions
        n = len(s.input_ids)
        ids[b, :n] = s.input_ids
        nxt[b, :n] = s.targets
        pos[b, : p.numel()] = p
        lens[b, : p.numel()] = s.label_len[p].long()
        # window j of position t is y[t+1+j]; clamp the index, the length masks what is past the end
        idx = (p[:, None] + 1 + torch.arange(k)).clamp(max=n - 1)
        labels[b, : p.numel()] = s.targets[idx]
        if hidden is not None:
            hidden[b, :n] = e.hidden
    # zero the labels past each window so padding never leaks into a loss or metric
    labels = labels * (torch.arange(k) < lens[..., None])
    return Batch(ids, nxt, hidden, None if dense else pos, labels, lens, B)


def make_batch(seqs: list[TrainSequence], positions: list[torch.Tensor | None], k: int,
               hidden_reader: HiddenReader | None) -> Batch:
    """Pad sequences and their sampled positions (None: every position) into one batch (stored hidden
    states when all have them)."""
    use_hidden = hidden_reader is not None and all(s.has_hidden for s in seqs)
    return collate([Example(s, p, hidden_reader.get(s) if use_hidden else None) for s, p in zip(seqs, positions)], k)


class EpochSteps(torch.utils.data.Dataset):
    """Item i: the examples of step i of an epoch's batch plan (positions sampled, hidden states read).

    Every item depends only on (plan, seed, epoch), never on which worker builds it or when, so a
    resumed run gets exactly the batches of an uninterrupted one.
    """

    def __init__(self, plan: list[list[TrainSequence]], max_positions: int | None, seed: int, epoch: int):
        self.plan, self.max_positions, self.seed, self.epoch = plan, max_positions, seed, epoch
        self.reader = HiddenReader()  # each worker opens its own handles (lazily, after the fork)

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, i: int) -> list[Example]:
        seqs = self.plan[i]
        use_hidden = all(s.has_hidden for s in seqs)
        every = self.max_positions is None  # every position: nothing to sample
        return [Example(s, None if every else sample_positions(s, self.max_positions, self.seed, self.epoch),
                        self.reader.get(s) if use_hidden else None) for s in seqs]


def loader_workers(requested: int | None, processes: int) -> int:
    """DataLoader workers: as asked, or (auto) one when a core is left over after the training processes.

    One is enough: a batch is read and padded in a few ms, against hundreds of ms of compute per step.
    """
    if requested is not None and requested >= 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if cores > processes else 0


def batch_loader(plan: list[list[TrainSequence]], k: int, max_positions: int | None, seed: int, epoch: int,
                 workers: int, pin_memory: bool) -> torch.utils.data.DataLoader:
    """The epoch's batches in plan order, built `workers` steps ahead in background processes
    (max_positions None: every position of each sequence)."""
    return torch.utils.data.DataLoader(
        EpochSteps(plan, max_positions, seed, epoch), batch_size=None, shuffle=False,
        collate_fn=partial(collate, k=k), num_workers=workers, pin_memory=pin_memory,
        prefetch_factor=2 if workers else None)
