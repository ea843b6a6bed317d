"""Read chat data files into conversations: user turns, and the dataset's replies where it has them.

Accepted files: a JSON list, or JSON Lines (one record a line). Each record is one of
    ShareGPT        {"conversations": [{"from": "human"|"gpt", "value": ...}, ...]}
    messages        {"messages": [{"role": "user"|"assistant", "content": ...}, ...]}
    question sets   {"turns": ["...", "..."]}                       (MT-Bench, Arena-Hard: no replies)
    Q&A             {"question": ..., "answer": ...}                (GSM8K)
    instruction     {"instruction": ..., "input": ..., "output": ...} (Alpaca)
    prompt          {"prompt": ..., "response"|"completion"|"output": ...}
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


def read_records(path: Path) -> list:
    """A JSON list or JSON Lines file as a list of records."""
    path = Path(path)
    if not path.is_file():
        raise CTCDrafterError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CTCDrafterError(f"cannot read {path}: {e}") from e
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise CTCDrafterError(f"{path} is not valid JSON: {e}") from e
        if isinstance(records, dict) and isinstance(records.get("data"), list):
            records = records["data"]
        if not isinstance(records, list):
            raise CTCDrafterError(f"{path} should hold a JSON list of records (or be JSON Lines)")
        return records
    records = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends, which splitlines() breaks on.
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise CTCDrafterError(f"{path} line {n} is not valid JSON: {e.msg}") from e
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


def parse_record(rec, rid: str) -> Conversation:
    """One record of any accepted format as a Conversation (possibly with no user turns)."""
    if not isinstance(rec, dict):
        raise CTCDrafterError(f"record {rid} is not a JSON object")
    rid = str(rec.get("id", rec.get("question_id", rid)))
    for key in ("conversations", "conversation", "messages"):
        if isinstance(rec.get(key), list):
            return _from_turn_list(rec[key], rid)
    if isinstance(rec.get("turns"), list):
        return Conversation(rid, [t for t in rec["turns"] if isinstance(t, str)], None)
    if _text(rec.get("question")) is not None:
        ans = _text(rec.get("answer"))
        return Conversation(rid, [rec["question"]], None if ans is None else [ans])
    if _text(rec.get("instruction")) is not None:
        prompt = rec["instruction"] + (f"\n\n{rec['input']}" if _text(rec.get("input")) else "")
        out = _text(rec.get("output"))
        return Conversation(rid, [prompt], None if out is None else [out])
    if _text(rec.get("prompt")) is not None:
        reply = next((rec[k] for k in ("response", "completion", "output") if _text(rec.get(k)) is not None), None)
        return Conversation(rid, [rec["prompt"]], None if reply is None else [reply])
    raise CTCDrafterError(
        f"record {rid}: unrecognised format (expected conversations/messages, turns, question/answer, "
        f"instruction/output or prompt/response)")


def iter_conversations(paths: list[Path]) -> Iterator[Conversation]:
    """Every record of every file, in order (ids default to file:index)."""
    for path in paths:
        records = read_records(path)
        for i, rec in enumerate(records):
            yield parse_record(rec, f"{Path(path).name}:{i}")
