"""`eval`: answer benchmark questions with a decoder and record each answer, with its speed, in the
answer file (answer_files.py holds the schema and the file handling).

Questions already answered in the file are skipped (a rerun continues a killed one); the file is
locked for the run and tidied (sorted, one answer per question) at its end.
"""

from __future__ import annotations

import logging

import json
import sys
from pathlib import Path

from tqdm import tqdm

from ..errors import CTCDrafterError, fault_reason
from .answer_files import (ANSWER_FORMAT, add_turn, answer_file_lock, answer_record, append_answer, check_answer_file,
                           check_resumable, new_choice, read_answers, reorganize_answer_file)
from .questions import Question

log = logging.getLogger(__name__)

__all__ = ["ANSWER_FORMAT", "answer_file_lock", "answer_question", "read_answers", "reorganize_answer_file",
           "run_eval", "warm_up"]


def answer_question(drafter, q: Question, speculative: bool, gen_kwargs: dict, template: str, seed: int | None,
                    num_choices: int = 1, on_turn=None) -> list[dict]:
    """All turns of `q`, each asked after the model's own previous answers, `num_choices` times.

    `on_turn(result)` is called after every turn (live progress on long multi-turn questions).
    """
    choices = []
    for i in range(num_choices):
        messages: list[dict] = []
        c = new_choice(i)
        for j, user in enumerate(q.turns):
            messages.append({"role": "user", "content": user})
            turn_seed = None if seed is None else seed + 1000 * i + j
            res = drafter.chat(messages, template=template, speculative=speculative, seed=turn_seed, **gen_kwargs)
            text = res.text.strip()
            messages.append({"role": "assistant", "content": text})
            add_turn(c, text, res)
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
    check_answer_file(path)  # before the lock file is made beside it (and again under the lock)
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
        log.info("%d question(s) already answered in %s; answering the other %d", summary["skipped"], path, len(todo))
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
            append_answer(path, answer_record(q, model_id, choices, meta))
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
