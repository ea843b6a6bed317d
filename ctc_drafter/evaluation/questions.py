"""Benchmark question files (MT-bench, GSM8K) and GSM8K answer extraction.

MT-bench (FastChat's question.jsonl): {"question_id", "category", "turns": [q1, q2]}; the second
turn is asked after the model's own first answer.
GSM8K (OpenAI's test.jsonl): {"question", "answer": "... #### 18"}; one turn; `question_id` is the
line index when the file has none (as in the reference implementation's GSM8K question file).
"""

from __future__ import annotations

import json
import re
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CTCDrafterError

log = logging.getLogger(__name__)

BENCHES = ("mt_bench", "gsm8k")

# The reference implementation's GSM8K instruction: it asks for the final answer after "###",
# which is also where `extract_final_number` looks first.
GSM8K_INSTRUCTION = ("Please carefully read the following math question, give a solution and the final "
                     "answer(put the final answer after ### at the end): ")


@dataclass
class Question:
    question_id: int | str
    turns: list[str]  # the user's messages, asked in order
    category: str
    reference: str | None = None  # GSM8K: the reference solution text ("... #### N")
    extra: dict = field(default_factory=dict)


def read_jsonl(path: str | Path, what: str = "file") -> tuple[list[tuple[int, dict]], int]:
    """(line number, object) for every JSON object line, and the count of lines that are not JSON objects.

    Blank lines are ignored; each bad line is reported once on stderr and skipped, so one corrupt
    line (e.g. the last one of a killed run) does not lose the rest of the file.
    """
    p = Path(path)
    if not p.exists():
        raise CTCDrafterError(f"{what} not found: {path}")
    if not p.is_file():
        raise CTCDrafterError(f"{what} {path} is not a file")
    rows, bad = [], 0
    try:
        with open(p, "rb") as f:  # bytes: a line that is not UTF-8 is one bad line, not a crash
            lines = f.read().split(b"\n")
    except OSError as e:
        raise CTCDrafterError(f"{what} {path} is unreadable: {e.strerror or e}") from e
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
            why = "is not a JSON object"
        except UnicodeDecodeError:
            obj, why = None, "is not UTF-8 text"
        except (ValueError, RecursionError):  # bad JSON, a number too long to convert, absurd nesting
            obj, why = None, "is not a JSON object"
        if not isinstance(obj, dict):
            bad += 1
            log.warning("%s:%d %s; skipped", path, n, why)
            continue
        rows.append((n, obj))
    if bad:
        log.warning("skipped %d bad line(s) in %s", bad, path)
    return rows, bad


def _mt_bench_question(n: int, obj: dict, path) -> Question:
    turns = obj.get("turns")
    if turns is None:
        hint = " (it looks like a GSM8K file: use --bench gsm8k)" if "question" in obj else ""
        raise CTCDrafterError(f"{path}:{n} has no 'turns' field, so it is not an MT-bench question file{hint}")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise CTCDrafterError(f"{path}:{n}: 'turns' must be a non-empty list of non-empty strings")
    if "question_id" not in obj:
        raise CTCDrafterError(f"{path}:{n} has no 'question_id'")
    return Question(_question_id(obj["question_id"], n, path), list(turns), str(obj.get("category", "unknown")))


def _question_id(qid, n: int, path):
    """Question ids are JSON integers or strings (FastChat's are integers)."""
    if isinstance(qid, bool) or not isinstance(qid, (int, str)):
        raise CTCDrafterError(f"{path}:{n}: 'question_id' must be an integer or a string, got {json.dumps(qid)}")
    return qid


def _gsm8k_question(n: int, index: int, obj: dict, path) -> Question:
    q = obj.get("question")
    if q is None:
        hint = " (it looks like an MT-bench file: use --bench mt_bench)" if "turns" in obj else ""
        raise CTCDrafterError(f"{path}:{n} has no 'question' field, so it is not a GSM8K question file{hint}")
    if not isinstance(q, str) or not q.strip():
        raise CTCDrafterError(f"{path}:{n}: 'question' must be a non-empty string")
    qid = _question_id(obj.get("question_id", index), n, path)
    return Question(qid, [GSM8K_INSTRUCTION + q], str(obj.get("category", "gsm8k")), reference=obj.get("answer"))


def load_questions(path: str | Path, bench: str, begin: int | None = None, end: int | None = None,
                   stride: int = 1) -> list[Question]:
    """Questions [begin, end) of a question file, every `stride`-th (indices count valid questions, as
    FastChat's do). stride 10 on MT-bench takes one question of each of its 8 categories."""
    if bench not in BENCHES:
        raise CTCDrafterError(f"unknown bench {bench!r} (use {' or '.join(BENCHES)})")
    rows, _ = read_jsonl(path, "question file")
    if not rows:
        raise CTCDrafterError(f"question file {path} has no questions")
    if bench == "mt_bench":
        qs = [_mt_bench_question(n, obj, path) for n, obj in rows]
    else:
        qs = [_gsm8k_question(n, i, obj, path) for i, (n, obj) in enumerate(rows)]
    ids = [q.question_id for q in qs]
    if len(set(map(str, ids))) != len(ids):
        raise CTCDrafterError(f"question file {path} repeats question ids")
    if stride < 1:
        raise CTCDrafterError(f"--question-stride must be >= 1, got {stride}")
    return _select(qs, begin, end, path)[::stride]


def _select(qs: list[Question], begin: int | None, end: int | None, path) -> list[Question]:
    n = len(qs)
    b = 0 if begin is None else begin
    e = n if end is None else end
    if not 0 <= b < n:
        raise CTCDrafterError(f"--question-begin {begin} is out of range: {path} has {n} questions (0..{n - 1})")
    if not b < e <= n:
        raise CTCDrafterError(f"--question-end {end} is out of range: need {b + 1}..{n} ({path} has {n} questions)")
    return qs[b:e]


def question_index(path: str | Path) -> dict[str, dict]:
    """question_id (as a string) -> {category, reference} for any question file (MT-bench or GSM8K)."""
    rows, _ = read_jsonl(path, "question file")
    out = {}
    for i, (_, obj) in enumerate(rows):
        qid = obj.get("question_id", i)
        out[str(qid)] = {"category": obj.get("category"), "reference": obj.get("answer")}
    return out


# ---- GSM8K answers -----------------------------------------------------------------------------

_NUMBER = r"-?\$?\s*\d[\d,]*(?:\.\d+)?"


def normalize_number(s: str) -> str | None:
    """'$1,234.50' -> '1234.5', '-0.0' -> '0'; None when `s` holds no number.

    On the digits themselves, never through float: a 900-digit answer would overflow it, and two
    different 20-digit answers would round to the same float.
    """
    m = re.search(r"(-?)(\d[\d,]*)(?:\.(\d+))?", s.replace("$", "").replace(" ", ""))
    if not m:
        return None
    sign, whole, frac = m.group(1), m.group(2).replace(",", "").lstrip("0") or "0", (m.group(3) or "").rstrip("0")
    text = whole + (f".{frac}" if frac else "")
    return text if text == "0" else sign + text


def extract_final_number(text: str) -> str | None:
    """The final numeric answer of a GSM8K solution.

    The number after the last '####' / '###' marker (the reference answers' and the prompt's
    convention) when there is one, else the last number in the text.
    """
    if not text:
        return None
    for marker in ("####", "###"):
        if marker in text:
            tail = text.rsplit(marker, 1)[1]
            m = re.search(_NUMBER, tail)
            if m:
                return normalize_number(m.group(0))
    nums = re.findall(_NUMBER, text)
    return normalize_number(nums[-1]) if nums else None


def gsm8k_references(path: str | Path) -> dict[str, str]:
    """question_id (as a string) -> the reference final number, from a GSM8K file with 'answer' fields."""
    refs = {}
    for qid, info in question_index(path).items():
        ans = info.get("reference")
        if isinstance(ans, str) and "####" in ans:
            num = extract_final_number(ans)
            if num is not None:
                refs[qid] = num
    if not refs:
        raise CTCDrafterError(f"{path} has no GSM8K reference answers ('answer' fields ending in '#### N')")
    return refs
