"""Answer benchmark questions and record speed in FastChat's answer-file schema.

One line per question, appended and flushed as soon as the question is done, so a killed run loses
at most the question in flight and a rerun answers only what is missing. The schema is the one the
reference implementation writes (FastChat's plus per-turn speed):

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
The reference's `idxs` are 0-based loop indices instead; `report` tells the two apart by `meta`.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from ..errors import CTCDrafterError, fault_reason
from .questions import Question, read_jsonl

ANSWER_FORMAT = "ctc-drafter-answers/1"


# ---- the answer file ---------------------------------------------------------------------------

def read_answers(path: str | Path) -> list[dict]:
    """Records of an answer file (bad lines warned about and skipped); [] when the file does not exist."""
    if not Path(path).exists():
        return []
    rows, _ = read_jsonl(path, "answer file")
    return [obj for _, obj in rows if "question_id" in obj]


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
                    "temperature", "proposer", "generator", "budget", "kernels", "draft_sha256"):
            if key in old and key in meta and old[key] != meta[key]:
                raise CTCDrafterError(
                    f"{path} already holds answers with {key}={old[key]!r} but this run has {key}={meta[key]!r}; "
                    "use another --model-id or --answer-file")


# ---- answering ---------------------------------------------------------------------------------

def answer_question(drafter, q: Question, speculative: bool, gen_kwargs: dict, template: str, seed: int | None,
                    num_choices: int = 1, on_turn=None) -> list[dict]:
    """All turns of `q`, each asked after the model's own previous answers, `num_choices` times.

    `on_turn(result)` is called after every turn (live progress on long multi-turn questions).
    """
    choices = []
    for i in range(num_choices):
        messages: list[dict] = []
        c = {"index": i, "turns": [], "idxs": [], "new_tokens": [], "wall_time": [], "accept_lengths": [],
             "tokens": [], "stop_reasons": []}
        for j, user in enumerate(q.turns):
            messages.append({"role": "user", "content": user})
            turn_seed = None if seed is None else seed + 1000 * i + j
            res = drafter.chat(messages, template=template, speculative=speculative, seed=turn_seed, **gen_kwargs)
            text = res.text.strip()
            messages.append({"role": "assistant", "content": text})
            c["turns"].append(text)
            c["idxs"].append(res.steps)
            c["new_tokens"].append(res.new_tokens)
            c["wall_time"].append(res.wall_s)
            c["accept_lengths"].append(res.accept_lengths)
            c["tokens"].append(res.tokens)
            c["stop_reasons"].append(res.stop_reason)
            if on_turn is not None:
                on_turn(res)
        choices.append(c)
    return choices


def warm_up(drafter, q: Question, speculative: bool, gen_kwargs: dict, template: str) -> None:
    """One untimed generation so one-off costs (allocator, kernels, lazy init) stay out of the timings."""
    kw = dict(gen_kwargs, max_new_tokens=min(gen_kwargs.get("max_new_tokens", 32), 32))
    drafter.chat([{"role": "user", "content": q.turns[0]}], template=template, speculative=speculative, seed=0, **kw)


def run_eval(drafter, questions: list[Question], answer_file: str | Path, model_id: str, meta: dict,
             speculative: bool, gen_kwargs: dict, template: str = "auto", seed: int | None = None,
             num_choices: int = 1, progress: bool = True) -> dict:
    """Answer the questions not yet in `answer_file`, appending each as it is done; then tidy the file.

    Returns {"answered", "skipped", "new_tokens", "wall_s", "steps", "answer_file"}.
    """
    if num_choices < 1:
        raise CTCDrafterError(f"--num-choices must be >= 1, got {num_choices}")
    path = Path(answer_file)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CTCDrafterError(f"cannot create the answer folder {path.parent}: {e.strerror}") from e
    if path.is_dir():
        raise CTCDrafterError(f"answer file {path} is a folder")
    with answer_file_lock(path):
        return _answer_missing(drafter, questions, path, model_id, meta, speculative, gen_kwargs, template, seed,
                               num_choices, progress)


def _answer_missing(drafter, questions: list[Question], path: Path, model_id: str, meta: dict, speculative: bool,
                    gen_kwargs: dict, template: str, seed: int | None, num_choices: int, progress: bool) -> dict:
    check_answer_file(path)
    existing = read_answers(path)
    check_resumable(existing, meta, path)
    done = {json.dumps(r["question_id"]) for r in existing}
    todo = [q for q in questions if json.dumps(q.question_id) not in done]
    summary = {"answered": 0, "skipped": len(questions) - len(todo), "new_tokens": 0, "wall_s": 0.0, "steps": 0,
               "answer_file": str(path)}
    if summary["skipped"]:
        print(f"ctc-drafter: {summary['skipped']} question(s) already answered in {path}; answering the other "
              f"{len(todo)}", file=sys.stderr)
    if todo:
        warm_up(drafter, todo[0], speculative, gen_kwargs, template)
    bar = tqdm(todo, desc=f"eval {model_id}", unit="q", disable=not progress, file=sys.stderr)

    def on_turn(res):
        summary["new_tokens"] += res.new_tokens
        summary["wall_s"] += res.wall_s
        summary["steps"] += res.steps
        bar.set_postfix(tok_s=f"{summary['new_tokens'] / max(summary['wall_s'], 1e-9):.1f}",
                        beta=f"{summary['new_tokens'] / max(summary['steps'], 1):.2f}")

    try:
        for q in bar:
            choices = answer_question(drafter, q, speculative, gen_kwargs, template, seed, num_choices, on_turn)
            append_answer(path, {
                "question_id": q.question_id, "answer_id": uuid.uuid4().hex, "model_id": model_id,
                "choices": choices, "tstamp": time.time(), "bench": meta["bench"], "category": q.category,
                "meta": meta,
            })
            summary["answered"] += 1
        bar.close()
        if path.exists():
            reorganize_answer_file(path)
    except Exception as e:  # noqa: BLE001 - only file-system faults are converted
        reason = fault_reason(e)
        if reason is None:
            raise
        raise CTCDrafterError(f"cannot write answer file {path}: {reason}; the {len(done) + summary['answered']} "
                              "answer(s) written before are kept (rerun to answer the rest)") from e
    return summary
