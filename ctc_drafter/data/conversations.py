"""Read chat data files into conversations: user turns, and the dataset's replies where it has them.

Accepted files: a JSON list, or JSON Lines (one record a line). Each record is one of
    ShareGPT        {"conversations": [{"from": "human"|"gpt", "value": ...}, ...]}
    messages        {"messages": [{"role": "user"|"assistant", "content": ...}, ...]}
    question sets   {"turns": ["...", "..."]}                       (MT-Bench, Arena-Hard: no replies)
    Q&A             {"question": ..., "answer": ...}                (GSM8K)
    instruction     {"instruction": ..., "input": ..., "output": ...} (Alpaca)
    prompt          {"prompt": ..., "response"|"completion"|"output": ...}

A record that is not usable (not an object, bad JSON on its line, missing fields, wrong types, empty
text) becomes a `Malformed` entry: reported, counted and skipped, never fatal. A file none of whose
records is in a known format, or that cannot be read at all, is an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import CTCDrafterError

USER_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant", "chatgpt", "bard", "bing", "model"}
SKIPPED_ROLES = {"system"}  # the templates have their own system prompt


@dataclass
class Conversation:
    id: str
    users: list[str]  # user turns, in order
    replies: list[str] | None  # the dataset's reply to each user turn; None when the file has none

    def messages(self, replies: list[str] | None = None) -> list[dict]:
        """Alternating user/assistant messages; `replies` (default: the dataset's) may be shorter."""
        replies = self.replies if replies is None else replies
        out = []
        for i, u in enumerate(self.users):
            out.append({"role": "user", "content": u})
            if replies is not None and i < len(replies):
                out.append({"role": "assistant", "content": replies[i]})
        return out


@dataclass
class Malformed:
    """A record that could not be used, kept in place so record numbering (and shard assignment) stays put."""

    id: str
    reason: str


class MalformedRecord(CTCDrafterError):
    """Raised by parse_record; `known` says whether the record looked like one of the accepted formats."""

    def __init__(self, message: str, known: bool = True):
        super().__init__(message)
        self.known = known


def read_records(path: Path) -> list:
    """A JSON list or JSON Lines file as a list of records; a JSON Lines line that does not parse
    becomes a MalformedRecord in its place."""
    path = Path(path)
    if not path.is_file():
        raise CTCDrafterError(f"data file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CTCDrafterError(f"cannot read {path}: {e.strerror or e}") from e
    head = raw.lstrip()[:1]
    if head in (b"[", b"{"):
        try:
            whole = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            if head == b"[":
                raise CTCDrafterError(f"{path} is not UTF-8 text (byte {e.start})") from e
            whole = None  # JSON Lines: a line that is not UTF-8 is one malformed record
        except (ValueError, RecursionError) as e:  # bad JSON, a number too long to convert, absurd nesting
            if head == b"[":
                raise CTCDrafterError(f"{path} is not valid JSON: {e}") from e
            whole = None  # JSON Lines: one object per line
        if isinstance(whole, dict) and isinstance(whole.get("data"), list):
            return whole["data"]
        if isinstance(whole, list):
            return whole
        if isinstance(whole, dict):
            return [whole]
    records = []
    # split on "\n", not splitlines(): JSON strings may hold U+2028 and friends, which splitlines() breaks on.
    for n, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            records.append(MalformedRecord(f"line {n} is not UTF-8 text (byte {e.start})", known=False))
            continue
        try:
            records.append(json.loads(line))
        except (ValueError, RecursionError) as e:  # bad JSON, a number too long to convert, absurd nesting
            records.append(MalformedRecord(f"line {n} is not valid JSON ({getattr(e, 'msg', type(e).__name__)})",
                                           known=False))
    return records


def _text(x) -> str | None:
    return x if isinstance(x, str) else None


def _from_turn_list(turns: list, rid: str) -> Conversation:
    """ShareGPT / messages turns -> alternating user, assistant; stops at the first break in the alternation."""
    users, replies = [], []
    for t in turns:
        if not isinstance(t, dict):
            break
        role = str(t.get("from", t.get("role", ""))).lower()
        text = _text(t.get("value", t.get("content")))
        if role in SKIPPED_ROLES:
            continue
        if text is None:
            break
        want_user = len(users) == len(replies)
        if role in USER_ROLES and want_user:
            users.append(text)
        elif role in ASSISTANT_ROLES and not want_user:
            replies.append(text)
        elif role in ASSISTANT_ROLES and not users:
            continue  # a conversation that opens with the assistant: drop that greeting
        else:
            break
    return Conversation(rid, users, replies)


def _reply_or_none(rec: dict, keys: tuple[str, ...], rid: str) -> list[str] | None:
    """The record's reference answer as a one-item list, None when it has none; wrong type -> malformed."""
    for k in keys:
        if k in rec and rec[k] is not None:
            if not isinstance(rec[k], str):
                raise MalformedRecord(f"record {rid}: {k!r} is not text")
            return [rec[k]]
    return None


def _parse_known(rec: dict, rid: str) -> Conversation:
    for key in ("conversations", "conversation", "messages"):
        if key in rec:
            if not isinstance(rec[key], list):
                raise MalformedRecord(f"record {rid}: {key!r} is not a list of turns")
            return _from_turn_list(rec[key], rid)
    if "turns" in rec:
        turns = rec["turns"]
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise MalformedRecord(f"record {rid}: 'turns' is not a list of strings")
        return Conversation(rid, list(turns), None)
    for key, answers in (("question", ("answer",)), ("instruction", ("output",)),
                         ("prompt", ("response", "completion", "output"))):
        if key not in rec:
            continue
        if not isinstance(rec[key], str):
            raise MalformedRecord(f"record {rid}: {key!r} is not text")
        prompt = rec[key]
        if key == "instruction" and _text(rec.get("input")):
            prompt += f"\n\n{rec['input']}"
        return Conversation(rid, [prompt], _reply_or_none(rec, answers, rid))
    raise MalformedRecord(
        f"record {rid}: unrecognised format (expected conversations/messages, turns, question/answer, "
        f"instruction/output or prompt/response)", known=False)


def parse_record(rec, rid: str) -> Conversation:
    """One record of any accepted format as a Conversation with at least one non-empty user turn.

    Raises MalformedRecord (a CTCDrafterError) for anything else.
    """
    if isinstance(rec, MalformedRecord):
        raise MalformedRecord(f"record {rid}: {rec}", known=rec.known)
    if not isinstance(rec, dict):
        raise MalformedRecord(f"record {rid} is not a JSON object", known=False)
    rid = str(rec.get("id", rec.get("question_id", rid)))
    conv = _parse_known(rec, rid)
    if not conv.users:
        raise MalformedRecord(f"record {rid}: no user turn")
    if not conv.users[0].strip():
        raise MalformedRecord(f"record {rid}: empty user turn")
    return conv


def iter_records(paths: list[Path]) -> Iterator[Conversation | Malformed]:
    """Every record of every file, in order (ids default to file:index); unusable ones as Malformed.

    A file with records but none in a known format is an error (it is not chat data at all).
    """
    for path in paths:
        records = read_records(path)
        out, known = [], False
        for i, rec in enumerate(records):
            rid = f"{Path(path).name}:{i}"
            try:
                out.append(parse_record(rec, rid))
                known = True
            except MalformedRecord as e:
                out.append(Malformed(rid, str(e)))
                known = known or e.known
        if records and not known:
            raise CTCDrafterError(f"{path}: unknown data format ({out[0].reason})")
        yield from out


def iter_conversations(paths: list[Path]) -> Iterator[Conversation]:
    """The usable conversations of every file, in order (malformed records left out)."""
    return (r for r in iter_records(paths) if isinstance(r, Conversation))
