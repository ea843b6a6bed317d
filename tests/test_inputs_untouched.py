"""No command writes to a file it did not create: each command that takes an existing path (make-prompts,
distill, eval, train, report) refuses one that is not its own with one line and exit 2, and leaves every
file in the folder byte for byte as it was (nothing added either)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from ctc_drafter.cli.main import main
from test_bad_input import MT_BENCH, _distilled, _eval, _train, one_line_error

DATA = Path(__file__).parent / "data"
SHAREGPT = DATA / "sharegpt_sample_head12.json"
GSM8K = DATA / "gsm8k_train_head8.jsonl"
OUR_SETTINGS = {"temperature": 0.5, "top_p": 0.95, "max_new_tokens": 4, "dtype": "float64"}


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def refused_untouched(capsys, root: Path, run, needle: str) -> None:
    before = snapshot(root)
    assert before, "the test must give the command existing files"
    one_line_error(capsys, run(), needle)
    assert snapshot(root) == before


# ---- make-prompts --out FILE -------------------------------------------------------------------

def _make_prompts(model_dir, out: Path):
    return main(["make-prompts", "--base-model", str(model_dir), "--out", str(out), "--count", "2",
                 "--max-new-tokens", "4", "--dtype", "float64", "--device", "cpu", "--json"])


OURS = json.dumps({"question_id": "self-0", "turns": ["Hello there friend"], "seed": 0, "settings": OUR_SETTINGS})


@pytest.mark.parametrize("content, needle", [
    (b'{"question_id": 1, "turns": ["What is 2 + 2?"]}', "not a file make-prompts wrote"),  # one line, no newline
    (SHAREGPT.read_bytes(), "not a file make-prompts wrote"),  # a ShareGPT JSON file: its last line is "]"
    (b'{"question_id": 1, "turns": ["What is 2 + 2?"]}\n', "records make-prompts did not write"),
    (b"\xff\xfe not text\n", "not a file make-prompts wrote"),
    (OURS.encode() + b'\n{"question_id": "self-1", "tu', "other settings"),  # its own, cut, other settings
])
def test_make_prompts_refuses_a_file_it_did_not_write(tmp_path, capsys, tiny_model_dir, content, needle):
    out = tmp_path / "prompts.jsonl"
    out.write_bytes(content)
    refused_untouched(capsys, tmp_path, lambda: _make_prompts(tiny_model_dir, out), needle)


def test_make_prompts_refuses_a_foreign_rejected_file(tmp_path, capsys, tiny_model_dir):
    out = tmp_path / "prompts.jsonl"
    (tmp_path / "prompts.jsonl.rejected.jsonl").write_text("my own notes\n")
    refused_untouched(capsys, tmp_path, lambda: _make_prompts(tiny_model_dir, out), "not a file make-prompts wrote")


# ---- distill --out FOLDER (and its --data) -----------------------------------------------------

def _distill(model_dir, data: Path, out: Path, *extra):
    return main(["distill", "--base-model", str(model_dir), "--out", str(out), "--dtype", "float64", "--device", "cpu",
                 "--data", str(data), "--limit", "2", "--mode", "teacher-forced", "--max-len", "100", *extra])


@pytest.mark.parametrize("files, needle", [
    ({"notes.txt": "mine"}, "holds files distill did not write"),
    ({"manifest.json": '{"name": "my web app", "version": 3}'}, "holds a manifest.json that ctc-drafter distill did not write"),
    ({"manifest.json": "not json"}, "holds a manifest.json that ctc-drafter distill did not write"),
])
def test_distill_refuses_a_folder_it_did_not_write_even_with_overwrite(tmp_path, capsys, tiny_model_dir, files,
                                                                        needle):
    data = tmp_path / "gsm8k.jsonl"
    shutil.copyfile(GSM8K, data)
    out = tmp_path / "out"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    refused_untouched(capsys, tmp_path, lambda: _distill(tiny_model_dir, data, out, "--overwrite"), needle)


def test_distill_refuses_a_file_as_its_folder(tmp_path, capsys, tiny_model_dir):
    data = tmp_path / "gsm8k.jsonl"
    shutil.copyfile(GSM8K, data)
    refused_untouched(capsys, tmp_path, lambda: _distill(tiny_model_dir, data, data), "is a file, not a folder")


# ---- eval --answer-file --------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"my notes\nsecond line\n", b'[{"question_id": 81}]',
                                     b'{"question_id": 81, "choices": []}\nnot a cut record'])
def test_eval_refuses_an_answer_file_it_did_not_write(tmp_path, capsys, tiny_model_dir, content):
    (tmp_path / "m.jsonl").write_bytes(content)
    refused_untouched(capsys, tmp_path, lambda: _eval(tiny_model_dir, tmp_path), "is not an answer file")


# ---- train --out FOLDER (and its --data) --------------------------------------------------------

@pytest.fixture
def distilled(tmp_path, tiny_model_dir):
    return _distilled(tmp_path, tiny_model_dir, {"complete": True})


def test_train_refuses_a_folder_that_is_not_a_training_run(tmp_path, capsys, tiny_model_dir, distilled):
    """A model folder as --out: train would replace its config.json and model.safetensors."""
    out = tmp_path / "a_model"
    shutil.copytree(tiny_model_dir, out)
    refused_untouched(capsys, tmp_path, lambda: _train(tiny_model_dir, distilled, out, "--overwrite"),
                      "holds files train did not write (e.g. ")


def test_train_refuses_an_earlier_run_without_overwrite(tmp_path, capsys, tiny_model_dir, distilled):
    out = tmp_path / "run"
    assert _train(tiny_model_dir, distilled, out) == 0
    capsys.readouterr()
    refused_untouched(capsys, tmp_path, lambda: _train(tiny_model_dir, distilled, out), "already holds a training run")


def test_train_refuses_a_zero_total_loss_weight(tmp_path, capsys, tiny_model_dir, distilled):
    """An AR head with every loss weight 0 would "train" at loss 0 and save an untrained draft."""
    out = tmp_path / "run"
    zero = ["--arch", "ar", "--feature-weight", "0", "--token-weight", "0", "--ctc-weight", "0"]
    refused_untouched(capsys, tmp_path, lambda: _train(tiny_model_dir, distilled, out, *zero),
                      "the total loss weight must be positive")
    assert not out.exists()


# ---- report SPEC --baseline BASE --plot ----------------------------------------------------------

def _answers(path: Path) -> Path:
    rec = {"question_id": 1, "choices": [{"index": 0, "turns": ["a"], "new_tokens": [3], "idxs": [2],
                                          "wall_time": [1.0]}]}
    path.write_text(json.dumps(rec) + "\n")
    return path


def test_report_refuses_a_bad_answer_file_untouched(tmp_path, capsys):
    spec = tmp_path / "spec.jsonl"
    spec.write_bytes(b'{"question_id": 1, "choices": "no"}\n')
    base = _answers(tmp_path / "base.jsonl")
    refused_untouched(capsys, tmp_path, lambda: main(["report", str(spec), "--baseline", str(base)]), str(spec))


@pytest.mark.parametrize("which", ["spec", "question file"])
def test_report_will_not_plot_over_one_of_its_inputs(tmp_path, capsys, which):
    spec, base = _answers(tmp_path / "spec.pdf"), _answers(tmp_path / "base.jsonl")  # any name is an answer file's
    q = tmp_path / "questions.svg"
    shutil.copyfile(MT_BENCH, q)
    plot = spec if which == "spec" else q
    run = lambda: main(["report", str(spec), "--baseline", str(base), "--question-file", str(q),  # noqa: E731
                        "--plot", str(plot)])
    refused_untouched(capsys, tmp_path, run, "is one of report's input files")
