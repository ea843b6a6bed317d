"""The answer file: FastChat's answer schema, as `eval` writes it and `report` reads it (the one home
of its fields). One line per question, appended and flushed as soon as the question is done, so a
killed run loses at most the question in flight and a rerun answers only what is missing. The schema
is the one the reference implementation writes (FastChat's plus per-turn speed):

    {"question_id", "answer_id", "model_id", "tstamp",
     "choices": [{"index", "turns": [text, ...], "idxs": [verification steps per turn],
                  "new_tokens": [...], "wall_time": [s, ...],
                  # extras, for `report`:
                  "accept_lengths": [[tokens per step, ...] per turn], "tokens": [[ids] per turn],
                  "stop_reasons": [...]}],
     "bench", "category", "meta": {format, engine, speculative, generator, budget, draft_trained, device, ...}}

`idxs` here counts base forward passes (prefill included), so sum(new_tokens)/sum(idxs) is beta. The
engine (`meta.engine`) is ours (CTCDrafter, speculative or --baseline) or HF generate (`hf`,
`hf-prompt-lookup`, see hf_engine.py), whose passes are counted the same way.
The reference's `idxs` are 0-based loop indices instead; `AnswerFile.ours` tells the two apart by `meta`.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CTCDrafterError
from .questions import Question, read_jsonl

ANSWER_FORMAT = "ctc-drafter-answers/1"


# ---- writing and continuing a file (eval) ------------------------------------------------------

def answer_meta(engine, bench: str, question_file, *, engine_kind: str = "ours", speculative: bool = True,
                draft_model: str | None = None, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                max_new_tokens: int = 256, template: str = "auto", seed: int | None = None) -> dict:
    """The `meta` of every record `eval` writes: what answered and with which settings.

    engine: a SpeculativeDecoder (engine_kind "ours"; speculative=False for its vanilla loop) or an
    HFEngine (engine_kind "hf" or "hf-prompt-lookup", whose speculation is HF's own). draft_model: the
    draft's name or folder as given (recorded where our speculative run loaded a draft).
    """
    ours = engine_kind == "ours"
    spec = speculative if ours else engine_kind == "hf-prompt-lookup"  # lookup drafts and verifies too
    draft = ours and spec
    has_draft = draft and engine.draft is not None  # n-gram lookup and draft-less plugins load none
    settings = engine.settings() if draft else {}
    return {
        "format": ANSWER_FORMAT,
        "bench": bench,
        "engine": engine_kind,
        "speculative": spec,
        "proposer": settings.get("proposer"),
        "generator": settings.get("generator"),
        "ctc_transform": settings.get("ctc_transform"),
        "budget": settings.get("budget"),
        "adaptive": settings.get("adaptive"),
        "prompt_lookup_tokens": engine.prompt_lookup_tokens if engine_kind == "hf-prompt-lookup" else None,
        "draft_model": str(draft_model) if has_draft and draft_model is not None else None,
        "draft_trained": engine.draft_trained if has_draft else None,
        "draft_sha256": getattr(engine.draft, "fingerprint", None) if draft else None,
        "base_model": engine.base.name,
        "device": str(engine.base.device),
        # llama.cpp: the GGUF's weight type and its threads; HF engines always run the stock layers
        "dtype": getattr(engine, "weights", None) or str(engine.base.dtype).replace("torch.", ""),
        "kernels": engine.kernels if ours else f"llama.cpp, {engine.threads} threads" if engine_kind == "llamacpp"
        else "stock",
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "max_new_tokens": max_new_tokens,
        "template": template,
        "seed": seed,
        "question_file": str(Path(question_file).resolve()),
    }


def new_choice(index: int) -> dict:
    """One choice of an answer record, before its turns."""
    return {"index": index, "turns": [], "idxs": [], "new_tokens": [], "wall_time": [], "accept_lengths": [],
            "tokens": [], "stop_reasons": [], "arm_steps": []}


def add_turn(choice: dict, text: str, res) -> None:
    """Record one turn: its text and the speed of the generation `res` (a GenerationResult) that made it."""
    choice["turns"].append(text)
    choice["idxs"].append(res.steps)
    choice["new_tokens"].append(res.new_tokens)
    choice["wall_time"].append(res.wall_s)
    choice["accept_lengths"].append(res.accept_lengths)
    choice["tokens"].append(res.tokens)
    choice["stop_reasons"].append(res.stop_reason)
    choice["arm_steps"].append(dict(getattr(res, "arm_steps", {})))  # steps per arm of the speculation switch


def answer_record(q: Question, model_id: str, choices: list[dict], meta: dict) -> dict:
    """One line of the file (question_id first: append_answer's cut-line check relies on it)."""
    return {"question_id": q.question_id, "answer_id": uuid.uuid4().hex, "model_id": model_id, "choices": choices,
            "tstamp": time.time(), "bench": meta["bench"], "category": q.category, "meta": meta}


def read_answers(path: str | Path) -> list[dict]:
    """Records of an answer file (bad lines warned about and skipped); [] when the file does not exist."""
    if not Path(path).exists():
        return []
    rows, _ = read_jsonl(path, "answer file")
    return [obj for _, obj in rows if "question_id" in obj]


def method_records(dirs, method: str) -> list[dict]:
    """Records of `<method>.jsonl` in each of dirs (a benchmark run's --part folders), in that order."""
    return [r for d in dirs for r in read_answers(Path(d) / f"{method}.jsonl")]


def check_answer_file(path: Path) -> None:
    """Refuse to add to (and later rewrite) a file that is not an answer file.

    One bad line is allowed, the last: the record a killed run was writing (the tidy-up drops it).
    """
    if not path.exists():
        return
    rows, bad = read_jsonl(path, "answer file")
    foreign = [n for n, obj in rows if "question_id" not in obj]
    last_good = max((n for n, _ in rows), default=0)
    lines = path.read_bytes().rstrip().split(b"\n")
    # append_answer writes question_id first: a record cut short by a kill still starts like one
    cut_last_line = bad == 1 and last_good < len(lines) and lines[-1].startswith(b'{"question_id"')
    if foreign or (bad and not cut_last_line):
        n = len(foreign) + bad
        raise CTCDrafterError(f"{path} is not an answer file ({n} line(s) are not answer records); eval would rewrite "
                              "it: give another --answer-file or --model-id")


def _ends_mid_line(path: Path) -> bool:
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def append_answer(path: str | Path, record: dict) -> None:
    """Append one answer line and push it to disk now: a kill after this keeps the question.

    A line cut short by an earlier kill is closed first, so the new record starts a line of its own
    (the partial line stays behind as one bad line, dropped when the file is reorganized).
    """
    path = Path(path)
    lead = "\n" if _ends_mid_line(path) else ""
    with open(path, "a", encoding="utf-8") as f:
        f.write(lead)
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _qid_key(qid):
    """Sort key for question ids that may mix ints and strings."""
    return (0, qid, "") if isinstance(qid, int) else (1, 0, str(qid))


def reorganize_answer_file(path: str | Path) -> int:
    """Sort by question_id, keep the last answer to each question, rewrite atomically. Returns the count."""
    latest = {}
    for rec in read_answers(path):
        latest[json.dumps(rec["question_id"])] = rec
    recs = sorted(latest.values(), key=lambda r: _qid_key(r["question_id"]))
    p = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=p.name + ".", suffix=".tmp", dir=p.parent)
    try:
        os.fchmod(fd, _file_mode(p))  # mkstemp makes 0600; the answer file keeps its mode (new: the umask's)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for rec in recs:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return len(recs)


def _file_mode(p: Path) -> int:
    """The permission bits `p` has, or those a new file gets under the process umask."""
    try:
        return p.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextmanager
def answer_file_lock(path: Path):
    """Hold an exclusive lock on `path` for one eval run; a second run on the same file is refused.

    The lock is a hidden file next to the answers (`.NAME.lock`), not the answers themselves, which
    are replaced when the run tidies them. The kernel drops it when the process ends, killed or not.
    """
    lock = path.with_name(f".{path.name}.lock")
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CREAT, 0o666)  # read-only: flock needs no more
    except OSError as e:
        raise CTCDrafterError(f"cannot create the lock file {lock}: {e.strerror or e}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CTCDrafterError(f"another `ctc-drafter eval` is writing {path} (it holds {lock}); wait for it to "
                                  "finish, or use another --model-id or --answer-file") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def check_resumable(existing: list[dict], meta: dict, path) -> None:
    """Refuse to mix answers of a different kind (bench, engine, base, baseline vs speculative) in one file."""
    for rec in existing:
        old = dict(rec.get("meta") or {})
        if old and "engine" not in old:
            old["engine"] = "ours"  # written before HF engines existed
        for key in ("bench", "engine", "prompt_lookup_tokens", "speculative", "base_model", "max_new_tokens",
                    "temperature", "proposer", "generator", "ctc_transform", "budget", "kernels", "draft_sha256",
                    "adaptive"):
            if key in old and key in meta and old[key] != meta[key]:
                raise CTCDrafterError(
                    f"{path} already holds answers with {key}={old[key]!r} but this run has {key}={meta[key]!r}; "
                    "use another --model-id or --answer-file")


# ---- reading, for `report` ---------------------------------------------------------------------

@dataclass
class AnswerFile:
    path: str
    records: dict[str, dict]  # json-encoded question_id -> record (last one wins, as FastChat's reorg)
    bad_lines: int = 0
    duplicates: list = field(default_factory=list)  # question ids answered more than once (earlier ones dropped)

    @property
    def first(self) -> dict:
        return next(iter(self.records.values()))

    @property
    def meta(self) -> dict:
        return self.first.get("meta") or {}

    @property
    def model_id(self) -> str:
        return str(self.first.get("model_id", Path(self.path).stem))

    @property
    def ours(self) -> bool:
        """Written by `ctc-drafter eval` (idxs = steps) rather than the reference code (idxs = steps - 1)."""
        return self.meta.get("format") == ANSWER_FORMAT

    @property
    def bench(self) -> str | None:
        return self.first.get("bench") or self.meta.get("bench")


def engine_label(f: AnswerFile) -> str:
    """Which decoder produced a file, in words: the rows of the benchmark table (ours vs HF)."""
    m = f.meta
    if not f.ours:
        return "reference implementation" if m else "unknown (the file records no meta)"
    engine = m.get("engine", "ours")  # files written before HF engines existed are ours
    if engine == "hf":
        return "HF generate"
    if engine == "hf-prompt-lookup":
        return f"HF prompt lookup (K={m.get('prompt_lookup_tokens')})"
    if engine == "llamacpp":
        return f"llama.cpp greedy ({m.get('dtype')} GGUF, {m.get('kernels')})"
    kernels = m.get("kernels")
    packed = f", {kernels} CPU kernels" if isinstance(kernels, str) and kernels != "stock" else ""
    if not m.get("speculative"):
        return f"ours, vanilla{packed}"
    untrained = ", untrained draft" if m.get("draft_trained") is False else ""
    who = f"{m['proposer']} {m.get('generator') or ''}".strip() if m.get("proposer") else m.get("generator")
    return f"ours, speculative ({who}, budget {m.get('budget')}{untrained}{packed})"


def load_answer_file(path: str | Path, what: str) -> AnswerFile:
    rows, bad = read_jsonl(path, f"{what} answer file")
    records, duplicates = {}, []
    for n, obj in rows:
        _check_record(obj, f"{path}:{n}")
        key = json.dumps(obj["question_id"])
        if key in records:
            duplicates.append(obj["question_id"])
        records[key] = obj
    if not records:
        raise CTCDrafterError(f"{what} answer file {path} has no answers" + (f" ({bad} bad lines)" if bad else ""))
    return AnswerFile(str(path), records, bad, duplicates)


MAX_COUNT = 10**15  # past any token count, step count or wall time; keeps sums exact and floats finite


def _is_count(x) -> bool:
    """A finite non-negative JSON number (json.loads accepts NaN, Infinity and 400-digit ints; a bool is
    not a count)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    return 0 <= x <= MAX_COUNT if isinstance(x, int) else math.isfinite(x) and 0 <= x <= MAX_COUNT


# meta fields the report compares or does arithmetic on, and the JSON types they may have (or null)
_META_TYPES = {"temperature": (int, float), "top_p": (int, float), "top_k": int, "max_new_tokens": int,
               "budget": int, "speculative": bool, "draft_trained": bool, "adaptive": bool}


def _check_record(obj: dict, where: str) -> None:
    """The fields `report` reads, with the JSON types it relies on; anything else is left alone."""
    qid = obj.get("question_id")
    if qid is None or isinstance(qid, bool) or not isinstance(qid, (int, str)):
        raise CTCDrafterError(f"{where} is not an answer record (needs a question_id, an integer or a string)")
    if not isinstance(obj.get("choices"), list) or not obj["choices"]:
        raise CTCDrafterError(f"{where} is not an answer record (needs question_id and choices)")
    meta = obj.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise CTCDrafterError(f"{where}: 'meta' must be a JSON object")
    for key, kinds in _META_TYPES.items():
        v = (meta or {}).get(key)
        if v is not None and (not isinstance(v, kinds) or (isinstance(v, bool) and kinds is not bool)
                              or (isinstance(v, float) and not math.isfinite(v))):
            raise CTCDrafterError(f"{where}: meta '{key}' has the wrong type ({json.dumps(v)})")
    for key in ("category", "bench", "model_id"):
        if obj.get(key) is not None and not isinstance(obj[key], (str, int)):
            raise CTCDrafterError(f"{where}: '{key}' must be a string")
    for c in obj["choices"]:
        if not isinstance(c, dict) or not isinstance(c.get("turns"), list):
            raise CTCDrafterError(f"{where}: every choice needs a 'turns' list")
        if not all(isinstance(t, str) for t in c["turns"]):
            raise CTCDrafterError(f"{where}: every turn must be a string")
        for key in ("new_tokens", "idxs", "wall_time"):
            v = c.get(key)
            if v is not None and not (isinstance(v, list) and all(_is_count(x) for x in v)):
                raise CTCDrafterError(f"{where}: '{key}' must be a list of finite non-negative numbers")
        for key in ("tokens", "accept_lengths"):
            v = c.get(key)
            if v is not None and not (isinstance(v, list) and all(
                    t is None or (isinstance(t, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                                              for i in t)) for t in v)):
                raise CTCDrafterError(f"{where}: '{key}' must be a list of integer lists, one per turn")
