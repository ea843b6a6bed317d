"""Conversations -> labelled training sequences: the base answers the user turns (mode regenerate)
or the dataset's answers are kept (teacher-forced); the chat template turns each conversation into
ids + a loss mask; the base's greedy next tokens become the targets (read off while generating, or
from one batched labelling pass). `label_shard` does all of it for one shard's records."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import CTCDrafterError
from ..models.templates import build_prompt_ids, encode_conversation
from .conversations import Conversation
from .distill_options import DistillOptions, Stats
from .labelling import generate_replies, label_batch, reply_batches, reply_seed
from .shards import Sequence


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
