"""Evaluation: answer benchmark questions (MT-bench, GSM8K) and report speedup, acceptance, agreement."""

from .eval import ANSWER_FORMAT, read_answers, reorganize_answer_file, run_eval
from .questions import Question, extract_final_number, gsm8k_references, load_questions
from .report import build_report, format_report, plot_report

__all__ = ["ANSWER_FORMAT", "Question", "build_report", "extract_final_number", "format_report",
           "gsm8k_references", "load_questions", "plot_report", "read_answers", "reorganize_answer_file", "run_eval"]
