"""Evaluation: answer benchmark questions (MT-bench, GSM8K) and report speedup, acceptance, agreement."""

from .answer_files import answer_meta
from .eval import ANSWER_FORMAT, read_answers, reorganize_answer_file, run_eval
from .questions import Question, extract_final_number, gsm8k_references, load_questions
from .report import build_report, format_report, plot_report

__all__ = ["ANSWER_FORMAT", "HFEngine", "Question", "answer_meta", "build_report", "extract_final_number",
           "format_report", "gsm8k_references", "load_questions", "plot_report", "read_answers", "reorganize_answer_file", "run_eval"]


def __getattr__(name):
    # HFEngine imports torch and the decoding package: loaded on first use, so `report` stays light.
    if name == "HFEngine":
        from .hf_engine import HFEngine

        return HFEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
