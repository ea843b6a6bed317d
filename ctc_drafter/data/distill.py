"""Distillation: chat data -> training shards labelled by the frozen base model.

    conversations --(responses="base")--> the base answers every user turn itself (self-distillation,
                                          so the draft learns the base's own continuations)
                  --chat template-------> ids + assistant mask, cut to max_length
                  --one base pass-------> the base's greedy next token at every position (+ hidden states)
                  --buffer--------------> shards of about shard_tokens tokens + manifest.json

Work goes in groups of `group_size` conversations (answered and labelled together). A shard is
written only at a group boundary and the manifest's cursor (conversations consumed) is updated
right after it, so an interrupted run resumes at the last shard and redoes at most one shard.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import CTCDrafterError
from ..models.templates import build_prompt_ids, encode_conversation
from .conversations import Conversation, iter_conversations
from .shards import MANIFEST, Sequence, read_manifest, shard_name, write_manifest, write_shard

FORMAT = "ctc-drafter-distill"
VERSION = 1
RESPONSES = ("base", "data")
LOGIT_ELEMS = 1 << 26  # LM-head rows per chunk * vocab: bounds the [rows, V] logits block (256 MB fp32)


@dataclass
class DistillOptions:
    responses: str = "base"  # base: the base answers each user turn; data: keep the dataset's replies
    template: str = "auto"
    max_length: int = 2048  # tokens per sequence (prompt + replies), longer ones are cut
    max_new_tokens: int = 512  # per generated reply
    temperature: float = 0.0  # 0 = greedy replies
    top_p: float = 1.0
    seed: int = 0
    limit: int | None = None  # conversations to read (all when None)
    shard_tokens: int = 1 << 18
    group_size: int = 256  # conversations per unit of work; a checkpoint can only fall between groups
    save_hidden: bool = False
    batch_size: int = 8  # sequences per base pass; does not change the data, so a resume may change it

    def validate(self) -> None:
        if self.responses not in RESPONSES:
            raise CTCDrafterError(f"--responses must be one of {', '.join(RESPONSES)}, got {self.responses!r}")
        for name in ("max_length", "max_new_tokens", "shard_tokens", "group_size", "batch_size"):
            if getattr(self, name) < 1:
                raise CTCDrafterError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_length < 2:
            raise CTCDrafterError("--max-length must be at least 2")
        if self.limit is not None and self.limit < 1:
            raise CTCDrafterError("--limit must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise CTCDrafterError("--temperature must be >= 0 and --top-p in (0, 1]")

    def content_key(self) -> dict:
        """The options that decide what the shards hold: a resumed run must agree on all of them."""
        d = asdict(self)
        d.pop("batch_size")
        d.pop("limit")  # conversations are taken in order: a larger limit extends a folder
        if self.responses == "data":  # generation settings play no part
            for k in ("max_new_tokens", "temperature", "top_p", "seed"):
                d.pop(k)
        return d


@dataclass
class Stats:
    conversations: int = 0  # read, including skipped ones
    sequences: int = 0
    tokens: int = 0
    train_tokens: int = 0  # positions with loss_mask 1
    agree: int = 0  # train positions where the data's next token is the base's greedy token
    replies_generated: int = 0
    replies_unfinished: int = 0  # cut by max_new_tokens / max_length before the base ended them
    skipped: dict = field(default_factory=dict)  # reason -> conversations

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
        d["agreement"] = round(self.agree / self.train_tokens, 4) if self.train_tokens else None
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
    rows = max(1, LOGIT_ELEMS // int(base.config.vocab_size))
    out = []
    for b, n in enumerate(lens):
        h = hidden[b, :n]  # [T,d]
        targets = torch.cat([head(h[i : i + rows]).argmax(-1) for i in range(0, n, rows)]).cpu()
        out.append((targets, h.to(torch.float16).cpu() if save_hidden else None))
    return out


@torch.no_grad()
def generate_replies(base, prompts: list[list[int]], budgets: list[int], temperature: float = 0.0,
                     top_p: float = 1.0) -> list[tuple[list[int], bool]]:
    """The base's replies to a batch of prompts: (tokens up to and incl. the end token, ended by the base?).

    Left padding lines every prompt up against the new tokens; `budgets` caps each reply.
    """
    from transformers import GenerationConfig

    dev, pad, eos = base.device, _pad_id(base), sorted(base.eos_token_ids)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    att = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p)
        att[b, width - len(p):] = 1
    sample = temperature > 0
    cfg = GenerationConfig(max_new_tokens=max(budgets), do_sample=sample, temperature=temperature if sample else None,
                           top_p=top_p if sample else None, top_k=0 if sample else None, pad_token_id=pad,
                           eos_token_id=eos or None, num_beams=1)
    out = base.model.generate(input_ids=ids.to(dev), attention_mask=att.to(dev), generation_config=cfg)
    replies = []
    for b, budget in enumerate(budgets):
        new = out[b, width:].tolist()[:budget]
        end = next((i for i, t in enumerate(new) if t in base.eos_token_ids), None)
        replies.append((new, False) if end is None else (new[: end + 1], True))
    return replies


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


def answer_conversations(base, convs: list[Conversation], opts: DistillOptions, stats: Stats) -> list[Answered | None]:
    """Self-distillation: the base answers each user turn in turn, seeing its own earlier replies.

    A conversation stops at a reply the base did not finish (a cut reply is kept: its tokens are
    still the base's) or when its prompt leaves no room under max_length. None: no reply at all.
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
            budget = min(opts.max_new_tokens, opts.max_length - len(prompt))
            if budget < 1:
                going[c] = False
                continue
            todo.append((c, msgs, prompt, budget))
        todo.sort(key=lambda x: len(x[2]))  # similar lengths together: less padding
        for i in range(0, len(todo), opts.batch_size):
            batch = todo[i : i + opts.batch_size]
            outs = generate_replies(base, [p for _, _, p, _ in batch], [b for *_, b in batch],
                                    opts.temperature, opts.top_p)
            for (c, msgs, prompt, _), (new, ended) in zip(batch, outs):
                text = reply_text(tok, new, msgs, opts.template)
                answered[c] = Answered((answered[c].replies if turn else []) + [text], prompt, new)
                stats.replies_generated += 1
                if not ended:
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
    last reply's exact tokens. Earlier replies' spans come from encoding the turns before it."""
    prev_ids, prev_mask = [], []
    if len(a.replies) > 1:
        msgs = Conversation("", users[: len(a.replies) - 1], a.replies[:-1]).messages()
        prev_ids, prev_mask = encode_conversation(tokenizer, msgs, template)
        if a.prompt[: len(prev_ids)] != prev_ids:
            raise CTCDrafterError("the chat template is not prefix-consistent")
    ids = a.prompt + a.reply
    amask = prev_mask + [False] * (len(a.prompt) - len(prev_ids)) + [True] * len(a.reply)
    return _with_loss_mask(ids, amask, max_length)


def _check_has_replies(convs: list[Conversation]) -> None:
    for c in convs:
        if c.replies is None:
            raise CTCDrafterError(f"conversation {c.id} has no replies in the data; use --responses base "
                                  f"to have the base model answer it")


def conversations_to_examples(base, convs: list[Conversation], opts: DistillOptions, stats: Stats) -> list:
    """Each conversation -> (ids, loss_mask) or None (skipped, with the reason counted)."""
    tok = base.tokenizer
    if opts.responses == "base":
        answered = answer_conversations(base, convs, opts, stats)
    else:
        _check_has_replies(convs)
    out = []
    for k, c in enumerate(convs):
        users = _usable_users(c)
        n = len(answered[k].replies) if opts.responses == "base" and answered[k] else min(len(users), len(c.replies or []))
        if not users:
            stats.skip("no user turn")
            out.append(None)
            continue
        if n == 0 or (opts.responses == "data" and not any(x.strip() for x in c.replies[:n])):
            stats.skip("no reply" if opts.responses == "data" else "no room for a reply under max_length")
            out.append(None)
            continue
        try:
            if opts.responses == "base":
                ex = base_example(tok, users, answered[k], opts.template, opts.max_length)
            else:
                ex = data_example(tok, Conversation(c.id, users[:n], c.replies[:n]).messages(), opts.template,
                                  opts.max_length)
        except CTCDrafterError:  # this text breaks the template's token boundaries; the rest may not
            stats.skip("template not prefix-consistent")
            out.append(None)
            continue
        if ex is None:
            stats.skip("no reply within max_length")
        out.append(ex)
    return out


def label_examples(base, examples: list, opts: DistillOptions, stats: Stats) -> list[Sequence]:
    """Base passes over the examples (batched by length); Sequences in the examples' order."""
    order = sorted((i for i, e in enumerate(examples) if e is not None), key=lambda i: len(examples[i][0]))
    seqs: dict[int, Sequence] = {}
    for k in range(0, len(order), opts.batch_size):
        idx = order[k : k + opts.batch_size]
        labelled = label_batch(base, [examples[i][0] for i in idx], opts.save_hidden)
        for i, (targets, hidden) in zip(idx, labelled):
            ids = torch.tensor(examples[i][0], dtype=torch.long)
            loss = torch.tensor(examples[i][1], dtype=torch.bool)
            seqs[i] = Sequence(ids, targets, loss, hidden)
            stats.sequences += 1
            stats.tokens += len(ids)
            stats.train_tokens += int(loss.sum())
            stats.agree += int(((targets[:-1] == ids[1:]) & loss[:-1]).sum())
    return [seqs[i] for i in sorted(seqs)]


def process_group(base, convs: list[Conversation], opts: DistillOptions, first_index: int) -> tuple[list[Sequence], Stats]:
    """One unit of work: conversations -> labelled Sequences, with their stats."""
    stats = Stats(conversations=len(convs))
    if opts.temperature > 0:  # seeded by position, so a resumed run samples the same replies
        torch.manual_seed(opts.seed + first_index)
    examples = conversations_to_examples(base, convs, opts, stats)
    return label_examples(base, examples, opts, stats), stats


# --------------------------------------------------------------------------- folder, manifest, resume


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def new_manifest(base, sources: list[Path], opts: DistillOptions) -> dict:
    return {
        "format": FORMAT,
        "version": VERSION,
        "base": base.signature(),
        "dtype": str(base.dtype).replace("torch.", ""),
        "template": opts.template,
        "hidden": opts.save_hidden,
        "options": opts.content_key(),
        "sources": [{"path": str(Path(p).resolve()), "sha256": file_sha256(p)} for p in sources],
        "shards": [],  # {"file", "sequences", "tokens", "train_tokens", "conversations": [first, end)}
        "cursor": 0,  # conversations consumed by the shards above
        "stats": Stats().to_dict(),
        "complete": False,
    }


def _identity(m: dict) -> dict:
    """What must match for a run to continue a folder's data."""
    return {"format": m.get("format"), "version": m.get("version"), "base": m.get("base"), "dtype": m.get("dtype"),
            "options": m.get("options"), "sources": [s.get("sha256") for s in m.get("sources", [])]}


def _describe_mismatch(old: dict, new: dict) -> str:
    a, b = _identity(old), _identity(new)
    diffs = []
    for k in a:
        if a[k] == b[k]:
            continue
        if isinstance(a[k], dict) and isinstance(b[k], dict):
            diffs += [f"{kk} {a[k].get(kk)!r} -> {b[k].get(kk)!r}" for kk in sorted(set(a[k]) | set(b[k]))
                      if a[k].get(kk) != b[k].get(kk)]
        elif k == "sources":
            diffs.append("the data files differ")
        else:
            diffs.append(f"{k} {a[k]!r} -> {b[k]!r}")
    return ", ".join(diffs)


def _owned_files(out_dir: Path) -> list[Path]:
    """Files distill writes (and may therefore delete)."""
    pats = ("shard_*.safetensors", "shard_*.safetensors.tmp", MANIFEST, MANIFEST + ".tmp")
    return [p for pat in pats for p in out_dir.glob(pat)]


def prepare_out_dir(out_dir: Path, fresh: dict, overwrite: bool) -> dict:
    """The manifest to continue from: `fresh` for a new or overwritten folder, else the folder's own."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CTCDrafterError(f"--out {out_dir} is a file, not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    owned = set(_owned_files(out_dir))
    foreign = [p for p in out_dir.iterdir() if p not in owned]
    if foreign:
        raise CTCDrafterError(f"--out {out_dir} holds files distill did not write (e.g. {foreign[0].name}); "
                              f"give an empty or new folder")
    if overwrite or not (out_dir / MANIFEST).is_file():
        for p in owned:
            p.unlink()
        return fresh
    old = read_manifest(out_dir)
    if _identity(old) != _identity(fresh):
        raise CTCDrafterError(f"{out_dir} holds data distilled with other settings ({_describe_mismatch(old, fresh)}); "
                              f"use --overwrite or another --out")
    keep = {s["file"] for s in old["shards"]} | {MANIFEST}
    for p in owned:  # half-written files and shards a crash left beyond the manifest's cursor
        if p.name not in keep:
            p.unlink()
    missing = [s["file"] for s in old["shards"] if not (out_dir / s["file"]).is_file()]
    if missing:
        raise CTCDrafterError(f"{out_dir} lacks {missing[0]}, listed in its manifest; use --overwrite to start again")
    return old


def distill(base, data_paths: list[Path], out_dir: Path, opts: DistillOptions, overwrite: bool = False,
            progress: bool = True) -> dict:
    """Distil `data_paths` into shards under `out_dir`, resuming a run left unfinished there; the manifest."""
    from tqdm.auto import tqdm

    opts.validate()
    if base.tokenizer is None:
        raise CTCDrafterError("distill needs a base model with a tokenizer")
    data_paths = [Path(p) for p in data_paths]
    if not data_paths:
        raise CTCDrafterError("no data files given")
    for p in data_paths:
        if not p.is_file():
            raise CTCDrafterError(f"data file not found: {p}")
    out_dir = Path(out_dir)
    convs = list(iter_conversations(data_paths))[: opts.limit]
    if not convs:
        raise CTCDrafterError(f"no conversations in {', '.join(map(str, data_paths))}")
    if opts.responses == "data":
        _check_has_replies(convs)
    manifest = prepare_out_dir(out_dir, new_manifest(base, data_paths, opts), overwrite)
    if manifest["cursor"] > len(convs):
        raise CTCDrafterError(f"{out_dir} already holds the first {manifest['cursor']} conversations; "
                              f"--limit {opts.limit} asks for fewer (use --overwrite or another --out)")
    if manifest["complete"] and manifest["cursor"] == len(convs):
        return manifest
    manifest["complete"] = False  # unfinished, or finished and now extended by a larger --limit
    done = Stats.from_dict(manifest["stats"])  # what the shards written so far hold
    with tqdm(total=len(convs), initial=manifest["cursor"], unit="conv", desc="distill", disable=not progress) as bar:
        leftover = _run_groups(base, convs, out_dir, manifest, opts, done, bar)
    done.add(leftover)  # groups after the last shard that produced nothing
    if not manifest["shards"]:
        skipped = ", ".join(f"{n} {r}" for r, n in done.skipped.items())
        raise CTCDrafterError(f"no usable conversations (skipped: {skipped or 'none'})")
    manifest.update(cursor=len(convs), complete=True, stats=done.to_dict())
    write_manifest(out_dir, manifest)
    return manifest


def _run_groups(base, convs, out_dir: Path, manifest: dict, opts: DistillOptions, done: Stats, bar) -> Stats:
    """Process groups from the cursor on, writing a shard (then the manifest) whenever enough tokens
    are buffered and at the end. Returns the stats of groups no shard holds (they yielded nothing)."""
    total, cursor = len(convs), manifest["cursor"]
    pending, buffer, t0 = Stats(), [], time.time()
    for start in range(cursor, total, opts.group_size):
        group = convs[start : start + opts.group_size]
        seqs, stats = process_group(base, group, opts, start)
        buffer += seqs
        pending.add(stats)
        end = start + len(group)
        bar.update(len(group))
        if buffer and (sum(len(s.input_ids) for s in buffer) >= opts.shard_tokens or end == total):
            _write_shard(out_dir, manifest, buffer, cursor, end)
            done.add(pending)
            manifest["stats"] = done.to_dict()
            t0 = _add_seconds(manifest, t0)
            write_manifest(out_dir, manifest)  # the checkpoint: a rerun starts after this shard
            buffer, pending, cursor = [], Stats(), end
        bar.set_postfix(seqs=done.sequences + pending.sequences, shards=len(manifest["shards"]))
    _add_seconds(manifest, t0)
    return pending


def _add_seconds(manifest: dict, since: float) -> float:
    """Wall time across all runs that built the folder."""
    now = time.time()
    manifest["seconds"] = round(manifest.get("seconds", 0.0) + now - since, 1)
    return now


def _write_shard(out_dir: Path, manifest: dict, seqs: list[Sequence], first: int, end: int) -> None:
    name = shard_name(len(manifest["shards"]))
    write_shard(out_dir / name, seqs)
    manifest["shards"].append({
        "file": name,
        "sequences": len(seqs),
        "tokens": sum(len(s.input_ids) for s in seqs),
        "train_tokens": sum(int(s.loss_mask.sum()) for s in seqs),
        "conversations": [first, end],
    })
    manifest["cursor"] = end
