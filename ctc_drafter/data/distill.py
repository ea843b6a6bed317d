"""Distillation: chat data -> training shards labelled by the frozen base model.

    records --(mode "regenerate")-------> the base answers every user turn itself, greedy, seeing its
                                          own earlier replies (the draft learns the base's continuations)
            --(mode "teacher-forced")---> the dataset's own answers are kept
            --chat template-------------> ids + assistant mask, cut to --max-len
            --one base pass-------------> the base's greedy next token at every position (+ hidden states)
            --shard i = records [i*S, (i+1)*S)--> shard_0000i.safetensors + shard_0000i.json (its counts)

The record -> shard assignment is fixed by the data and --shard-size alone, so shards can be made in
any order, by any number of processes (`--workers`, `--gpus`, `accelerate launch`), and a rerun
redoes only shards without their .json: the result is the same files as one uninterrupted process.
A shard's .json is written after its tensors (both atomically), so Ctrl-C never leaves a shard that
looks finished but is not. When every shard is done, one process gathers the .json files into
manifest.json and marks it complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import CTCDrafterError, write_json_atomic, writing
from ..models.templates import build_prompt_ids, encode_conversation
from .batch_generation import LOGIT_ELEMS, Reply, Sampling, argmax_in_chunks, generate_batch
from .conversations import Conversation, Malformed, iter_records
from .shards import MANIFEST, Sequence, read_manifest, shard_name, write_manifest, write_shard

FORMAT = 1  # manifest format
MODES = ("regenerate", "teacher-forced")
MODE_ALIASES = {"base": "regenerate", "data": "teacher-forced", "teacher_forced": "teacher-forced"}
MALFORMED_EXAMPLES = 5  # reasons the manifest keeps
KV_TOKENS = 1 << 15  # rows x (prompt + reply) of one generation batch: bounds its KV cache (~1.5 GB for SmolLM2-135M)


@dataclass
class DistillOptions:
    mode: str = "regenerate"  # regenerate: the base answers each user turn; teacher-forced: the dataset's answers
    template: str = "auto"
    max_len: int = 2048  # tokens per sequence (prompt + replies), longer ones are cut
    max_new_tokens: int = 512  # per generated reply
    temperature: float = 0.0  # 0 = greedy replies
    top_p: float = 1.0
    seed: int = 0
    limit: int | None = None  # records to read (all when None)
    shard_size: int = 64  # records per shard: fixes which shard every record lands in
    save_hidden: bool = False
    batch_size: int = 8  # prompts decoded together / sequences per labelling pass; not part of the data's
    # identity (a resume may change it), though in float32 it can flip a near-tie (scripts/batch_agreement.py)

    def __post_init__(self):
        self.mode = MODE_ALIASES.get(self.mode, self.mode)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise CTCDrafterError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("max_new_tokens", "shard_size", "batch_size"):
            if getattr(self, name) < 1:
                raise CTCDrafterError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_len < 2:
            raise CTCDrafterError("--max-len must be at least 2")
        if self.limit is not None and self.limit < 1:
            raise CTCDrafterError("--limit must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise CTCDrafterError("--temperature must be >= 0 and --top-p in (0, 1]")

    def content_key(self) -> dict:
        """The options that decide what the shards hold: a resumed run must agree on all of them."""
        d = asdict(self)
        d.pop("batch_size")
        d.pop("limit")  # records are taken in order: a larger limit extends a folder
        if self.mode == "teacher-forced":  # generation settings play no part
            for k in ("max_new_tokens", "temperature", "top_p", "seed"):
                d.pop(k)
        return d


@dataclass
class Stats:
    records: int = 0  # read, including skipped and malformed ones
    malformed: int = 0
    sequences: int = 0
    tokens: int = 0
    assistant_tokens: int = 0  # positions with loss_mask 1 (the next token is the assistant's)
    agree: int = 0  # trained positions where the data's next token is the base's greedy token
    replies_generated: int = 0
    replies_unfinished: int = 0  # cut by max_new_tokens / max_len before the base ended them
    skipped: dict = field(default_factory=dict)  # reason -> records

    def add(self, other: "Stats") -> None:
        for k, v in asdict(other).items():
            if k == "skipped":
                for r, n in v.items():
                    self.skipped[r] = self.skipped.get(r, 0) + n
            else:
                setattr(self, k, getattr(self, k) + v)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["agreement"] = round(self.agree / self.assistant_tokens, 4) if self.assistant_tokens else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Stats":
        return cls(**{k: v for k, v in d.items() if k != "agreement"})


# --------------------------------------------------------------------------- base passes


def _pad_id(base) -> int:
    tok = base.tokenizer
    if tok is not None and tok.pad_token_id is not None:
        return int(tok.pad_token_id)
    return min(base.eos_token_ids, default=0)


@torch.no_grad()
def label_batch(base, seqs: list[list[int]], save_hidden: bool = False) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """One base pass over right-padded sequences: per sequence (greedy next tokens [T], hidden [T,d] fp16 or None).

    Right padding keeps every real token at its own position and, the attention being causal,
    out of reach of the pads; the LM head runs in row chunks so a long batch never holds [B,T,V].
    """
    dev = base.device
    lens = [len(s) for s in seqs]
    ids = torch.full((len(seqs), max(lens)), _pad_id(base), dtype=torch.long)
    att = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        att[b, : len(s)] = 1
    hidden = base.model.base_model(input_ids=ids.to(dev), attention_mask=att.to(dev), use_cache=False).last_hidden_state
    head = base.model.get_output_embeddings()
    out = []
    for b, n in enumerate(lens):
        h = hidden[b, :n]  # [T,d]
        targets = argmax_in_chunks(head, h, LOGIT_ELEMS)
        out.append((targets, h.to(torch.float16).cpu() if save_hidden else None))
    return out


def generate_replies(base, prompts: list[list[int]], budgets: list[int], temperature: float = 0.0,
                     top_p: float = 1.0, seeds: list[int] | None = None, save_hidden: bool = False) -> list[Reply]:
    """The base's replies to a batch of prompts, each with the base's greedy targets over prompt + reply.

    `budgets` caps each reply; sampling (temperature > 0) draws reply b from a generator seeded with seeds[b].
    """
    sampling = Sampling(temperature, top_p)
    gens = None if sampling.greedy else [torch.Generator().manual_seed(s) for s in seeds]
    return generate_batch(base, prompts, budgets, _pad_id(base), base.eos_token_ids, sampling, gens,
                          labels=True, keep_hidden=save_hidden)


def reply_batches(todo: list, batch_size: int, max_tokens: int = KV_TOKENS) -> list[list]:
    """Consecutive runs of `todo` (sorted by prompt length; items end with (prompt, budget)) of at most
    batch_size prompts whose cache, rows x (longest prompt + largest budget), stays under max_tokens."""
    batches, cur = [], []
    for item in todo:
        grown = cur + [item]
        width = max(len(x[-2]) for x in grown) + max(x[-1] for x in grown)
        if cur and (len(grown) > batch_size or len(grown) * width > max_tokens):
            batches.append(cur)
            grown = [item]
        cur = grown
    return batches + ([cur] if cur else [])


def reply_seed(seed: int, record: int, turn: int) -> int:
    """The sampling seed of one reply: fixed by --seed, the record's place in the data and the turn."""
    return (seed << 40) + (record << 12) + turn


# --------------------------------------------------------------------------- conversations -> sequences


def _usable_users(conv: Conversation) -> list[str]:
    """User turns up to the first empty one (the templates refuse empty prompts)."""
    out = []
    for u in conv.users:
        if not u.strip():
            break
        out.append(u)
    return out


def reply_text(tokenizer, tokens: list[int], messages: list[dict], template: str) -> str:
    """A generated reply as message text, as the base wrote it where the template allows.

    Leading whitespace can merge with the template's separator into other tokens (the conversation
    would then not encode prefix-consistently); only then is it dropped.
    """
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if text != text.lstrip():
        try:
            encode_conversation(tokenizer, messages + [{"role": "assistant", "content": text}], template)
        except CTCDrafterError:
            text = text.lstrip()
    return text


@dataclass
class Answered:
    """A conversation as the base answered it."""

    replies: list[str]  # text of each reply (earlier ones are re-encoded into later prompts)
    prompt: list[int]  # prompt ids of the last reply
    reply: list[int]  # the last reply's tokens exactly as the base generated them (end token included)
    targets: torch.Tensor | None = None  # [len(prompt + reply)] the base's greedy next tokens, from generating it
    hidden: torch.Tensor | None = None  # [len(prompt + reply), d] fp16, with --save-hidden


def answer_conversations(base, convs: list[Conversation], opts: DistillOptions, stats: Stats,
                         first_seed: int = 0) -> list[Answered | None]:
    """Self-distillation: the base answers each user turn in turn, seeing its own earlier replies.

    Every turn's prompts go to the base in batches of up to --batch-size, sorted by length (little padding).
    Sampled replies are seeded by reply_seed(--seed, first_seed + conversation, turn).
    A conversation stops at a reply the base did not finish (a cut reply is kept: its tokens are
    still the base's) or when its prompt leaves no room under --max-len. None: no reply at all.
    """
    tok = base.tokenizer
    users = [_usable_users(c) for c in convs]
    answered: list[Answered | None] = [None] * len(convs)
    going = [bool(u) for u in users]
    for turn in range(max((len(u) for u in users), default=0)):
        todo = []  # (conversation, messages, prompt ids, token budget)
        for c, u in enumerate(users):
            if not going[c] or turn >= len(u):
                continue
            msgs = Conversation(convs[c].id, u[: turn + 1], answered[c].replies if turn else []).messages()
            prompt = build_prompt_ids(tok, msgs, opts.template)
            budget = min(opts.max_new_tokens, opts.max_len - len(prompt))
            if budget < 1:
                going[c] = False
                continue
            todo.append((c, msgs, prompt, budget))
        todo.sort(key=lambda x: len(x[2]))  # similar lengths together: less padding
        for batch in reply_batches(todo, opts.batch_size):
            outs = generate_replies(base, [p for _, _, p, _ in batch], [b for *_, b in batch],
                                    opts.temperature, opts.top_p,
                                    [reply_seed(opts.seed, first_seed + c, turn) for c, *_ in batch], opts.save_hidden)
            for (c, msgs, prompt, _), r in zip(batch, outs):
                text = reply_text(tok, r.tokens, msgs, opts.template)
                answered[c] = Answered((answered[c].replies if turn else []) + [text], prompt, r.tokens,
                                       r.targets, r.hidden)
                stats.replies_generated += 1
                if not r.ended:
                    stats.replies_unfinished += 1
                    going[c] = False
    return answered


def _with_loss_mask(ids: list[int], amask: list[bool], max_length: int):
    """(ids, loss_mask) cut to max_length, or None when no position trains.

    loss_mask[t] is 1 when token t+1 is the assistant's: position t is where the draft, given the
    base's state at t, learns what follows.
    """
    ids, amask = ids[:max_length], amask[:max_length]
    loss = amask[1:] + [False]
    return (ids, loss) if any(loss) else None


def data_example(tokenizer, messages: list[dict], template: str, max_length: int):
    """A conversation with the data's replies, through the template: (ids, loss_mask) or None."""
    return _with_loss_mask(*encode_conversation(tokenizer, messages, template), max_length)


def base_example(tokenizer, users: list[str], a: Answered, template: str, max_length: int):
    """A conversation the base answered: the last prompt (earlier turns as the base saw them) + the
    last reply's exact tokens. Earlier replies' spans come from encoding the turns before it.
    (ids, loss_mask, targets, hidden) with the targets (and hidden states) generation read off, or None."""
    prev_ids, prev_mask = [], []
    if len(a.replies) > 1:
        msgs = Conversation("", users[: len(a.replies) - 1], a.replies[:-1]).messages()
        prev_ids, prev_mask = encode_conversation(tokenizer, msgs, template)
        if a.prompt[: len(prev_ids)] != prev_ids:
            raise CTCDrafterError("the chat template is not prefix-consistent")
    ids = a.prompt + a.reply
    amask = prev_mask + [False] * (len(a.prompt) - len(prev_ids)) + [True] * len(a.reply)
    ex = _with_loss_mask(ids, amask, max_length)
    if ex is None:
        return None
    n = len(ex[0])
    return ex + (a.targets[:n], None if a.hidden is None else a.hidden[:n])


def conversations_to_examples(base, convs: list[Conversation], opts: DistillOptions, stats: Stats,
                              first_seed: int = 0) -> list:
    """Each conversation -> (ids, loss_mask), (ids, loss_mask, targets, hidden) when the base answered it,
    or None (skipped, with the reason counted)."""
    tok = base.tokenizer
    regen = opts.mode == "regenerate"
    answered = answer_conversations(base, convs, opts, stats, first_seed) if regen else None
    out = []
    for k, c in enumerate(convs):
        users = _usable_users(c)
        n = min(len(users), len(c.replies or []))
        if not users:
            reason = "no user turn"
        elif regen and answered[k] is None:
            reason = "no room for a reply under --max-len"
        elif not regen and (n == 0 or not any(r.strip() for r in c.replies[:n])):
            reason = "no dataset answer"
        else:
            reason = None
        if reason:
            stats.skip(reason)
            out.append(None)
            continue
        try:
            if regen:
                ex = base_example(tok, users, answered[k], opts.template, opts.max_len)
            else:
                msgs = Conversation(c.id, users[:n], c.replies[:n]).messages()
                ex = data_example(tok, msgs, opts.template, opts.max_len)
        except CTCDrafterError:  # this text breaks the template's token boundaries; the rest may not
            stats.skip("template not prefix-consistent")
            out.append(None)
            continue
        if ex is None:
            stats.skip("no reply within --max-len")
        out.append(ex)
    return out


def _sequence(ids: list[int], loss: list[bool], targets: torch.Tensor, hidden, stats: Stats) -> Sequence:
    ids, loss = torch.tensor(ids, dtype=torch.long), torch.tensor(loss, dtype=torch.bool)
    stats.sequences += 1
    stats.tokens += len(ids)
    stats.assistant_tokens += int(loss.sum())
    stats.agree += int(((targets[:-1] == ids[1:]) & loss[:-1]).sum())
    return Sequence(ids, targets, loss, hidden)


def label_examples(base, examples: list, opts: DistillOptions, stats: Stats) -> list[Sequence]:
    """Sequences in the examples' order: those the base generated keep the targets read off while
    generating; the others get a base pass (batched by length)."""
    seqs = {i: _sequence(*e, stats) for i, e in enumerate(examples) if e is not None and len(e) == 4}
    order = sorted((i for i, e in enumerate(examples) if e is not None and len(e) == 2), key=lambda i: len(examples[i][0]))
    for k in range(0, len(order), opts.batch_size):
        idx = order[k : k + opts.batch_size]
        labelled = label_batch(base, [examples[i][0] for i in idx], opts.save_hidden)
        for i, (targets, hidden) in zip(idx, labelled):
            seqs[i] = _sequence(*examples[i], targets, hidden, stats)
    return [seqs[i] for i in sorted(seqs)]


def label_shard(base, records: list, opts: DistillOptions, first_index: int) -> tuple[list[Sequence], Stats]:
    """One shard's records (Conversation or Malformed) -> labelled Sequences, with their stats.

    Depends only on the records, the options and where the shard starts: any process makes the
    same shard (batches are formed within the shard; a sampled reply is seeded by its conversation's place).
    """
    convs = [r for r in records if isinstance(r, Conversation)]
    stats = Stats(records=len(records), malformed=len(records) - len(convs))
    examples = conversations_to_examples(base, convs, opts, stats, first_seed=first_index)
    return label_examples(base, examples, opts, stats), stats


# --------------------------------------------------------------------------- the data plan


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Plan:
    """The records to distil (after --limit) and their fixed split into shards."""

    records: list  # Conversation | Malformed, in file order
    inputs: list[dict]  # {"path", "sha256", "records"} per data file
    shard_size: int

    @property
    def num_shards(self) -> int:
        return math.ceil(len(self.records) / self.shard_size)

    def shard(self, i: int) -> tuple[int, list]:
        """(index of its first record, records) of shard i: records [i*S, (i+1)*S)."""
        first = i * self.shard_size
        return first, self.records[first : first + self.shard_size]

    def malformed(self) -> dict:
        bad = [r for r in self.records if isinstance(r, Malformed)]
        return {"count": len(bad), "examples": [r.reason for r in bad[:MALFORMED_EXAMPLES]]}


def read_plan(data_paths: list, opts: DistillOptions) -> Plan:
    """Read and check the data: one-line errors for missing, unreadable, unknown or unusable data."""
    opts.validate()
    paths = [Path(p) for p in data_paths]
    if not paths:
        raise CTCDrafterError("no data files given")
    for p in paths:
        if not p.is_file():
            raise CTCDrafterError(f"data file not found: {p}")
    records, inputs = [], []
    for p in paths:
        recs = list(iter_records([p]))
        records += recs
        inputs.append({"path": str(p.resolve()), "sha256": file_sha256(p), "records": len(recs)})
    records = records[: opts.limit]
    names = ", ".join(map(str, paths))
    if not records:
        raise CTCDrafterError(f"no records in {names}")
    convs = [r for r in records if isinstance(r, Conversation)]
    if not convs:
        raise CTCDrafterError(f"no usable records in {names}: all {len(records)} are malformed "
                              f"(first: {records[0].reason})")
    if opts.mode == "teacher-forced" and not any(c.replies for c in convs):
        raise CTCDrafterError(f"no record in {names} has a dataset answer, which --mode teacher-forced needs; "
                              f"use --mode regenerate to have the base model answer")
    return Plan(records, inputs, opts.shard_size)


# --------------------------------------------------------------------------- folder, manifest, resume


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def new_manifest(signature: dict, dtype: str, plan: Plan, opts: DistillOptions) -> dict:
    return {
        "format": FORMAT,
        "producer": "ctc-drafter distill",
        "base": signature,
        "dtype": dtype,
        "template": opts.template,
        "mode": opts.mode,
        "hidden": opts.save_hidden,
        "options": opts.content_key(),
        "inputs": plan.inputs,
        "records": len(plan.records),
        "shard_size": opts.shard_size,
        "shards": [],  # {"file", "index", "first", "records", "sequences", "tokens", "assistant_tokens"}
        "malformed": plan.malformed(),
        "stats": Stats().to_dict(),
        "complete": False,
    }


def _identity(m: dict) -> dict:
    """What must match for a run to continue a folder's data."""
    return {"format": m.get("format"), "base": m.get("base"), "dtype": m.get("dtype"), "options": m.get("options"),
            "inputs": [s.get("sha256") for s in m.get("inputs", [])]}


def _describe_mismatch(old: dict, new: dict) -> str:
    a, b = _identity(old), _identity(new)
    diffs = []
    for k in a:
        if a[k] == b[k]:
            continue
        if isinstance(a[k], dict) and isinstance(b[k], dict):
            diffs += [f"{kk} {a[k].get(kk)!r} -> {b[k].get(kk)!r}" for kk in sorted(set(a[k]) | set(b[k]))
                      if a[k].get(kk) != b[k].get(kk)]
        elif k == "inputs":
            diffs.append("the data files differ")
        else:
            diffs.append(f"{k} {a[k]!r} -> {b[k]!r}")
    return ", ".join(diffs)


def result_name(i: int) -> str:
    """Shard i's counts; its presence marks the shard finished."""
    return shard_name(i).replace(".safetensors", ".json")


def _owned_files(out_dir: Path) -> list[Path]:
    """Files distill writes (and may therefore delete)."""
    pats = ("shard_*.safetensors", "shard_*.json", "shard_*.tmp", MANIFEST, MANIFEST + ".tmp")
    return [p for pat in pats for p in out_dir.glob(pat)]


def prepare_out_dir(out_dir: Path, fresh: dict, overwrite: bool, write: bool = True) -> dict:
    """The manifest to continue from: `fresh` for a new or overwritten folder, else the folder's own.

    write=False makes the same checks and decision without touching the folder (the other processes
    of a launch, while the main one prepares it).
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise CTCDrafterError(f"--out {out_dir} is a file, not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    owned = set(_owned_files(out_dir))
    foreign = [p for p in out_dir.iterdir() if p not in owned]
    if foreign:
        raise CTCDrafterError(f"--out {out_dir} holds files distill did not write (e.g. {foreign[0].name}); "
                              f"give an empty or new folder")
    if overwrite or not (out_dir / MANIFEST).is_file():
        if write:
            for p in owned:
                p.unlink(missing_ok=True)
            write_manifest(out_dir, fresh)
        return fresh
    old = read_manifest(out_dir)
    if _identity(old) != _identity(fresh):
        raise CTCDrafterError(f"{out_dir} holds data distilled with other settings ({_describe_mismatch(old, fresh)}); "
                              f"use --overwrite or another --out")
    if old.get("records", 0) > fresh["records"]:
        raise CTCDrafterError(f"{out_dir} already holds the first {old['records']} records; "
                              f"--limit {fresh['records']} asks for fewer (use --overwrite or another --out)")
    if old.get("complete") and old.get("records") == fresh["records"]:
        return old
    if write:
        for p in owned:  # half-written files a crash left
            if p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)
        write_manifest(out_dir, fresh)  # records, malformed: the new --limit's
    return fresh


def _read_result(out_dir: Path, i: int) -> dict | None:
    try:
        return json.loads((out_dir / result_name(i)).read_text())
    except (OSError, ValueError):
        return None


def shard_done(out_dir: Path, plan: Plan, i: int) -> bool:
    """Finished: its .json exists, covers the records the plan gives it, and its tensors are there."""
    r = _read_result(out_dir, i)
    first, records = plan.shard(i)
    return (r is not None and r.get("first") == first and r.get("records") == len(records)
            and (r.get("file") is None or (out_dir / r["file"]).is_file()))


def pending_shards(out_dir: Path, plan: Plan) -> list[int]:
    return [i for i in range(plan.num_shards) if not shard_done(out_dir, plan, i)]


def save_shard(out_dir: Path, i: int, first: int, seqs: list[Sequence], stats: Stats, seconds: float,
               worker: int = 0) -> dict:
    """Shard i's tensors, then its counts (the order makes the .json the 'finished' mark)."""
    (out_dir / result_name(i)).unlink(missing_ok=True)  # a redone shard is unfinished until the end
    name = shard_name(i)
    if seqs:
        write_shard(out_dir / name, seqs)
    else:  # every record skipped: no tensors, and none left from an earlier, longer version of it
        (out_dir / name).unlink(missing_ok=True)
    result = {"index": i, "file": name if seqs else None, "first": first, "records": stats.records,
              "sequences": len(seqs), "tokens": stats.tokens, "assistant_tokens": stats.assistant_tokens,
              "seconds": round(seconds, 2), "worker": worker, "stats": stats.to_dict()}
    with writing(out_dir / result_name(i), kept="finished shards are kept; rerun the same command to resume"):
        write_json_atomic(out_dir / result_name(i), result, indent=1)
    return result


def make_shard(base, out_dir: Path, i: int, first: int, records: list, opts: DistillOptions, worker: int = 0) -> int:
    """Label and save shard i (records [first, first + len(records))); its token count."""
    t0 = time.time()
    seqs, stats = label_shard(base, records, opts, first)
    save_shard(out_dir, i, first, seqs, stats, time.time() - t0, worker)
    return stats.tokens


def run_shards(base, plan: Plan, shard_ids: list[int], out_dir: Path, opts: DistillOptions, report=None,
               worker: int = 0) -> None:
    """Make the given shards in this process; report(records, tokens) after each."""
    for i in shard_ids:
        first, records = plan.shard(i)
        tokens = make_shard(base, out_dir, i, first, records, opts, worker)
        if report is not None:
            report(len(records), tokens)


def finalize(out_dir: Path, plan: Plan, manifest: dict) -> dict:
    """Gather every shard's counts into the manifest and mark it complete."""
    results = [_read_result(out_dir, i) for i in range(plan.num_shards)]
    missing = [i for i, r in enumerate(results) if r is None or not shard_done(out_dir, plan, i)]
    if missing:
        raise CTCDrafterError(f"shard {missing[0]} of {out_dir} is not finished ({len(missing)} missing); "
                              f"run the same command again to make it")
    total = Stats()
    for r in results:
        total.add(Stats.from_dict(r["stats"]))
    shards = [{k: r[k] for k in ("file", "index", "first", "records", "sequences", "tokens", "assistant_tokens")}
              for r in results if r["file"]]
    if not shards:
        skipped = ", ".join(f"{n} {r}" for r, n in total.skipped.items())
        raise CTCDrafterError(f"no usable records (skipped: {skipped or 'none'}; malformed: {total.malformed})")
    manifest = {**manifest, "shards": shards, "stats": total.to_dict(), "complete": True,
                "seconds": round(sum(r["seconds"] for r in results), 1)}
    write_manifest(out_dir, manifest)
    return manifest


# --------------------------------------------------------------------------- one process


def records_in(plan: Plan, shard_ids: list[int]) -> int:
    return sum(len(plan.shard(i)[1]) for i in shard_ids)


@contextmanager
def progress_bar(total: int, initial: int, enabled: bool, desc: str = "distill"):
    """A tqdm bar over records, with tokens/s; yields report(records, tokens) to advance it."""
    from tqdm.auto import tqdm

    t0, tokens = time.time(), [0]
    with tqdm(total=total, initial=initial, unit="rec", desc=desc, disable=not enabled, dynamic_ncols=True,
              file=sys.stderr) as bar:
        def report(records: int, new_tokens: int) -> None:
            tokens[0] += new_tokens
            bar.update(records)
            bar.set_postfix_str(f"{tokens[0] / max(time.time() - t0, 1e-9):.0f} tok/s")

        yield report


def _check_base(base) -> None:
    if base.tokenizer is None:
        raise CTCDrafterError("distill needs a base model with a tokenizer")


def distill(base, data_paths: list[Path], out_dir: Path, opts: DistillOptions, overwrite: bool = False,
            progress: bool = True, plan: Plan | None = None) -> dict:
    """Distil `data_paths` into shards under `out_dir` in this process, resuming a run left unfinished there."""
    opts.validate()
    _check_base(base)
    plan = plan or read_plan(data_paths, opts)
    out_dir = Path(out_dir)
    manifest = prepare_out_dir(out_dir, new_manifest(base.signature(), dtype_name(base.dtype), plan, opts), overwrite)
    if manifest["complete"]:
        return manifest
    todo = pending_shards(out_dir, plan)
    with progress_bar(len(plan.records), len(plan.records) - records_in(plan, todo), progress) as report:
        run_shards(base, plan, todo, out_dir, opts, report)
    return finalize(out_dir, plan, manifest)


# --------------------------------------------------------------------------- accelerate launch


def launched_distributed() -> bool:
    """Started by `accelerate launch` / torchrun with several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def distributed_state(cpu: bool):
    """accelerate's PartialState for this launch. Processes wait for each other only at the start and
    at the end, possibly for as long as a shard takes, hence the long timeout."""
    from datetime import timedelta

    from accelerate import PartialState

    state = PartialState(cpu=cpu, timeout=timedelta(hours=24))
    if state.num_processes != int(os.environ["WORLD_SIZE"]):
        raise CTCDrafterError(f"launched as {os.environ['WORLD_SIZE']} processes but accelerate sees "
                              f"{state.num_processes}; on a machine without GPUs pass --device cpu")
    return state


def distill_data_parallel(state, base, data_paths: list[Path], out_dir: Path, opts: DistillOptions,
                          overwrite: bool = False, progress: bool = True, plan: Plan | None = None) -> dict | None:
    """`distill` as one of the processes of a launch: process r makes shards r, r+n, ... (those not
    finished yet); the main process prepares the folder first and writes the manifest last.

    Every process runs the same checks on the same inputs, so a bad input stops all of them alike
    before anyone waits for the others. Returns the manifest on the main process, None elsewhere.
    """
    opts.validate()
    _check_base(base)
    plan = plan or read_plan(data_paths, opts)
    out_dir = Path(out_dir)
    fresh = new_manifest(base.signature(), dtype_name(base.dtype), plan, opts)
    manifest = prepare_out_dir(out_dir, fresh, overwrite, write=state.is_main_process)
    if manifest["complete"]:
        return manifest if state.is_main_process else None
    state.wait_for_everyone()  # the folder is ready
    mine = [i for i in range(state.process_index, plan.num_shards, state.num_processes)
            if not shard_done(out_dir, plan, i)]
    desc = f"distill [{state.process_index + 1}/{state.num_processes}]"
    with progress_bar(records_in(plan, mine), 0, progress and state.is_main_process, desc) as report:
        run_shards(base, plan, mine, out_dir, opts, report, worker=state.process_index)
    state.wait_for_everyone()  # every shard is written
    return finalize(out_dir, plan, manifest) if state.is_main_process else None


# --------------------------------------------------------------------------- worker processes (--workers, --gpus)


@dataclass
class BaseSpec:
    """How to load the base: what a worker process needs to load it itself."""

    name_or_path: str
    device: str = "auto"
    dtype: str = "auto"


def parse_gpu_groups(text: str) -> list[list[int]]:
    """'0;1;2;3' -> [[0], [1], [2], [3]] (a worker each); '0,1;2,3' -> [[0, 1], [2, 3]]."""
    groups = []
    for part in text.split(";"):
        ids = [x.strip() for x in part.split(",")]
        if not part.strip() or not all(x.isdigit() for x in ids):
            raise CTCDrafterError(f"--gpus {text!r}: give GPU numbers, ',' within a worker's group and ';' "
                                  f"between workers, e.g. '0;1;2;3' or '0,1;2,3'")
        groups.append([int(x) for x in ids])
    return groups


def check_gpu_groups(groups: list[list[int]], text: str) -> None:
    """Every GPU named must exist here (numbers as CUDA_VISIBLE_DEVICES, if set, shows them)."""
    if not torch.cuda.is_available():
        raise CTCDrafterError(f"--gpus {text!r} given, but CUDA is not available here "
                              f"(use --workers N for several CPU processes)")
    n = torch.cuda.device_count()
    bad = sorted({g for grp in groups for g in grp if g >= n})
    if bad:
        raise CTCDrafterError(f"--gpus {text!r} names GPU {bad[0]}, but only {n} GPU(s) are visible (0..{n - 1})")


def visible_devices(group: list[int]) -> str:
    """CUDA_VISIBLE_DEVICES for a worker: the group's GPUs, as the parent's own visibility numbers them."""
    parent = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [x.strip() for x in parent.split(",")] if parent else None
    return ",".join(names[g] if names else str(g) for g in group)


def describe_base(spec: BaseSpec, device: torch.device) -> tuple[dict, str, int]:
    """(signature, dtype name, max length) of a base from its config alone: the folder can be checked
    before loading the weights (which worker processes load themselves)."""
    from transformers import AutoConfig

    from ..models.base import DEFAULT_BASE, DEFAULT_NAME, _model_name, default_model_dir, resolve_dtype

    if spec.name_or_path == DEFAULT_BASE:
        path, gguf, name = default_model_dir(), None, DEFAULT_NAME
    else:
        p = Path(spec.name_or_path).expanduser()
        if not p.exists():
            raise CTCDrafterError(f"base model not found: {spec.name_or_path} (give a local folder, a .gguf file "
                                  f"or 'default')")
        path, gguf = (p.parent, p.name) if p.is_file() else (p, None)
        name = _model_name(p, gguf)
    try:
        cfg = AutoConfig.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad model path for the user
        raise CTCDrafterError(f"cannot load base model {spec.name_or_path}: {str(e).strip().splitlines()[0]}") from e
    # as BaseModel.signature() / .max_length read them from the loaded model's config
    sig = {"base_model": name, "hidden_size": int(cfg.hidden_size), "vocab_size": int(cfg.vocab_size)}
    max_len = int(getattr(cfg, "max_position_embeddings", 1 << 30))
    return sig, dtype_name(resolve_dtype(spec.dtype, device)), max_len


def load_worker_base(spec: BaseSpec, gpus: int):
    """The base in a worker: on --device (CPU workers), on its one visible GPU, or spread over its
    visible GPUs like device_map="auto" (balanced) when it has several."""
    from ..models.base import load_base_model, resolve_dtype

    if gpus == 0:
        return load_base_model(spec.name_or_path, device=spec.device, dtype=spec.dtype)
    dtype = resolve_dtype(spec.dtype, torch.device("cuda"))
    if gpus == 1:
        return load_base_model(spec.name_or_path, device="cuda", dtype=dtype)
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    base = load_base_model(spec.name_or_path, device="cpu", dtype=dtype)
    no_split = list(getattr(base.model, "_no_split_modules", None) or [])
    memory = get_balanced_memory(base.model, dtype=dtype, no_split_module_classes=no_split)
    device_map = infer_auto_device_map(base.model, max_memory=memory, no_split_module_classes=no_split, dtype=dtype)
    dispatch_model(base.model, device_map=device_map)
    return base


def _worker_main(rank: int, spec: BaseSpec, cuda_visible: str | None, threads: int | None, expect: tuple,
                 opts: DistillOptions, out_dir: Path, work: list, queue) -> None:
    """A worker process: load the base, make its shards, tell the parent ("progress" | "error" | "done")."""
    if cuda_visible is not None:  # before anything touches CUDA (the parent set it for the spawn too)
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible
    if threads:
        torch.set_num_threads(threads)
    code = 0
    try:
        base = load_worker_base(spec, 0 if cuda_visible is None else len(cuda_visible.split(",")))
        got = (base.signature(), dtype_name(base.dtype))
        if got != expect:
            raise CTCDrafterError(f"worker {rank} loaded {got}, the folder was prepared for {expect}")
        _check_base(base)
        for i, first, records in work:
            tokens = make_shard(base, out_dir, i, first, records, opts, rank)
            queue.put(("progress", rank, len(records), tokens))
        queue.put(("done", rank))
    except KeyboardInterrupt:
        code = 130
    except CTCDrafterError as e:
        queue.put(("error", rank, str(e)))
        code = 2
    except BaseException as e:  # noqa: BLE001 - a bug: the parent reports it, the traceback goes to stderr
        import traceback

        traceback.print_exc()
        queue.put(("error", rank, f"{type(e).__name__}: {e}"))
        code = 1
    queue.close()
    queue.join_thread()  # the message reaches the parent before this process ends
    sys.exit(code)


@contextmanager
def _env(**values):
    """Set environment variables for processes started inside (spawned children copy the environment)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _follow_workers(procs: list, queue, report) -> None:
    """Relay progress until every worker is done; the first error (or silent death) stops the run."""
    import queue as queue_mod

    finished = set()
    while len(finished) < len(procs):
        try:
            msg = queue.get(timeout=0.5)
        except queue_mod.Empty:
            dead = [(r, p.exitcode) for r, p in enumerate(procs) if r not in finished and p.exitcode is not None]
            if dead:  # its last message would have been queued before it exited
                try:
                    msg = queue.get(timeout=2)
                except queue_mod.Empty:
                    r, code = dead[0]
                    raise CTCDrafterError(f"worker {r} stopped (exit code {code}) without finishing its shards; "
                                          f"run the same command again to resume") from None
            else:
                continue
        kind, rank, *rest = msg
        if kind == "progress":
            report(*rest)
        elif kind == "done":
            finished.add(rank)
        else:
            raise CTCDrafterError(f"worker {rank}: {rest[0]}")


def distill_with_workers(spec: BaseSpec, data_paths: list[Path], out_dir: Path, opts: DistillOptions,
                         gpu_groups: list[list[int]] | None = None, workers: int = 1, overwrite: bool = False,
                         progress: bool = True, plan: Plan | None = None) -> dict:
    """`distill` over worker processes: one per GPU group (`--gpus`), else `workers` on spec.device.

    The shards still to make are dealt out round-robin; each worker loads the base itself. The same
    shards come out as from one process, and an interrupted run resumes from whatever was finished.
    """
    from ..models.base import resolve_device

    opts.validate()
    plan = plan or read_plan(data_paths, opts)
    out_dir = Path(out_dir)
    device = torch.device("cuda") if gpu_groups else resolve_device(spec.device)
    signature, dtype, _ = describe_base(spec, device)
    manifest = prepare_out_dir(out_dir, new_manifest(signature, dtype, plan, opts), overwrite)
    if manifest["complete"]:
        return manifest
    todo = pending_shards(out_dir, plan)
    slots = [visible_devices(g) for g in gpu_groups] if gpu_groups else [None] * workers
    slots = slots[: len(todo)]  # no idle workers
    threads = None
    if not gpu_groups and "OMP_NUM_THREADS" not in os.environ:  # share the cores instead of oversubscribing
        threads = max(1, (os.cpu_count() or 1) // max(1, len(slots)))
    with progress_bar(len(plan.records), len(plan.records) - records_in(plan, todo), progress) as report:
        run_workers(spec, slots, threads, (signature, dtype), opts, out_dir,
                    [[(i, *plan.shard(i)) for i in todo[r :: len(slots)]] for r in range(len(slots))], report)
    return finalize(out_dir, plan, manifest)


def run_workers(spec: BaseSpec, slots: list, threads: int | None, expect: tuple, opts: DistillOptions,
                out_dir: Path, works: list[list], report) -> None:
    """One spawned process per slot (its CUDA_VISIBLE_DEVICES, or None for --device), each making
    the shards of its work list; returns when all are done, raises on the first failure."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # a fresh interpreter: CUDA_VISIBLE_DEVICES applies, no forked CUDA state
    queue = ctx.Queue()
    procs = []
    try:
        for rank, (visible, work) in enumerate(zip(slots, works)):
            with _env(CUDA_VISIBLE_DEVICES=visible):
                p = ctx.Process(target=_worker_main, name=f"distill-worker-{rank}",
                                args=(rank, spec, visible, threads, expect, opts, out_dir, work, queue))
                p.start()
            procs.append(p)
        _follow_workers(procs, queue, report)
    finally:
        for p in procs:  # after an error or Ctrl-C: finished shards stay, the rest is redone next time
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join()
