"""Bad input and faults, one test per failure class: each ends in one `ctc-drafter: error:` line and
exit code 2 (never a traceback), and a fault in the middle of a run keeps the finished work."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctc_drafter.cli.main import main

DATA = Path(__file__).parent / "data"
MT_BENCH = DATA / "mt_bench_question.jsonl"


def one_line_error(capsys, code, needle: str, mid_run: bool = False) -> str:
    """Exit 2 and exactly one line on stderr (transformers' weight-loading bar aside), holding `needle`.

    mid_run: a fault after the run started, whose progress lines come first; the error is the last line.
    """
    out = capsys.readouterr()
    err = [ln for ln in out.err.splitlines() if ln.strip() and "Loading weights" not in ln
           and not ln.startswith("ctc-drafter: warning:") and not ln.startswith("ctc-drafter: note:")]
    if mid_run:
        assert sum(ln.startswith("ctc-drafter: error:") for ln in err) == 1, out.err
        err = err[-1:]
    assert code == 2, out.err
    assert len(err) == 1 and err[0].startswith("ctc-drafter: error:"), out.err
    assert needle in err[0], err[0]
    assert "Traceback" not in out.err
    return err[0]


def generate(model_dir, *extra):
    return main(["generate", "--base-model", str(model_dir), "--prompt", "hi", "--max-new-tokens", "4",
                 "--device", "cpu", "--json", *map(str, extra)])


# ---- draft config.json ------------------------------------------------------------------------

GOOD_CONFIG = {"model_type": "ctc_draft", "hidden_size": 32, "vocab_size": 64, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 64}


@pytest.mark.parametrize("content, needle", [
    (json.dumps({**GOOD_CONFIG, "num_frames": "8"}).encode(), "num_frames must be an integer"),
    (json.dumps({**GOOD_CONFIG, "label_len": None}).encode(), "label_len must be an integer, got null"),
    (json.dumps({**GOOD_CONFIG, "rope_theta": float("nan")}).encode(), "rope_theta must be a finite number"),
    (json.dumps({**GOOD_CONFIG, "num_frames": True}).encode(), "num_frames must be an integer, got true"),
    (json.dumps({**GOOD_CONFIG, "hidden_size": 10**9}).encode(), "hidden_size must be between"),
    (json.dumps([GOOD_CONFIG]).encode(), "must hold a JSON object, not a list"),
    (b'{"model_type": "ctc_draft", "base_model": "caf\xe9"}', "not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),  # nesting past the parser's recursion limit
])
def test_draft_config_json(tmp_path, capsys, tiny_model_dir, content, needle):
    d = tmp_path / "draft"
    d.mkdir()
    (d / "config.json").write_bytes(content)
    one_line_error(capsys, generate(tiny_model_dir, "--draft-model", d), needle)


def test_train_config_file_types_and_bytes(tmp_path, capsys):
    data = tmp_path / "data"  # never read: --config fails first... after the data check, so make one
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"base": {}, "complete": True}))
    for content, needle in ((b'{"num_frames": "many"}', "num_frames must be an integer"),
                            (b"\xff\xfe{}", "not UTF-8"),
                            (b"[1, 2]", "JSON object")):
        cfg = tmp_path / "cfg.json"
        cfg.write_bytes(content)
        code = main(["train", "--base-model", "default", "--data", str(data), "--out", str(tmp_path / "o"),
                     "--config", str(cfg), "--device", "cpu"])
        one_line_error(capsys, code, needle)
    for inline, needle in (('{"num_frames": "many"}', "num_frames must be an integer"),
                           ('{"num_frames": 4', "not valid JSON")):
        code = main(["train", "--base-model", "default", "--data", str(data), "--out", str(tmp_path / "o"),
                     "--config", inline, "--device", "cpu"])
        one_line_error(capsys, code, needle)


def test_train_config_inline_json_is_the_file_s_equal(tmp_path):
    """--config takes the overrides inline (as its help shows) or from a file, with the same result."""
    from ctc_drafter.training.options import TrainOptions, config_overrides

    cfg = tmp_path / "cfg.json"
    cfg.write_text('{"num_context_layers": 2, "num_frames": 6}')
    inline = config_overrides(TrainOptions(data=["d"], out="o", config=' {"num_context_layers": 2, "num_frames": 6}'))
    assert inline == config_overrides(TrainOptions(data=["d"], out="o", config=str(cfg)))
    assert inline[0]["num_context_layers"] == 2 and inline[0]["num_frames"] == 6


# ---- text that is not UTF-8 --------------------------------------------------------------------

def test_prompt_that_is_not_utf8(capsys):
    # Python keeps undecodable argv bytes as lone surrogates (b"\xff" -> "\udcff")
    one_line_error(capsys, main(["generate", "--prompt", "caf\udcff"]), "--prompt is not valid UTF-8")


def test_prompt_that_is_not_utf8_from_a_shell():
    r = subprocess.run([sys.executable, "-m", "ctc_drafter", "generate", "--prompt", b"\xff\xfe hi"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("ctc-drafter: error:") and r.stderr.count("\n") == 1


def test_question_file_that_is_not_utf8(tmp_path, capsys):
    lines = MT_BENCH.read_bytes().split(b"\n")[:2]
    q = tmp_path / "q.jsonl"
    q.write_bytes(lines[0] + b"\n" + b'{"question_id": 5, "turns": ["caf\xe9"]}\n' + lines[1] + b"\n")
    from ctc_drafter.evaluation.questions import load_questions

    assert [x.question_id for x in load_questions(q, "mt_bench")] == [81, 82]  # the bad line is skipped
    assert "q.jsonl:2 is not UTF-8 text; skipped" in capsys.readouterr().err
    q.write_bytes(b"\xff\xfe\x00\x01" * 10)
    code = main(["eval", "--bench", "mt_bench", "--question-file", str(q), "--model-id", "x",
                 "--answer-dir", str(tmp_path)])
    one_line_error(capsys, code, "has no questions")


def test_answer_file_that_is_not_utf8(tmp_path, capsys):
    a = tmp_path / "a.jsonl"
    a.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xd8")
    one_line_error(capsys, main(["report", str(a), "--baseline", str(a)]), "has no answers")


def test_manifest_that_is_not_utf8_or_not_an_object(tmp_path, capsys):
    d = tmp_path / "data"
    d.mkdir()
    for content, needle in ((b"\xff\xfe{}", "not UTF-8"), (b"[]", "a JSON object was expected"),
                            (b'{"complete": "yes"}', "'complete' must be a JSON bool"),
                            (b'{"shards": [{"file": 3}]}', "'file' name")):
        (d / "manifest.json").write_bytes(content)
        code = main(["train", "--data", str(d), "--out", str(tmp_path / "o"), "--device", "cpu"])
        one_line_error(capsys, code, "manifest.json is corrupt")


# ---- numbers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value, needle", [
    ("--temperature", "nan", "not a finite number"), ("--temperature", "inf", "not a finite number"),
    ("--temperature", "1e-300", "too small to sample with"), ("--top-p", "nan", "not a finite number"),
    ("--top-p", "0", "out of range"), ("--seed", str(10**30), "out of range"),
    ("--max-new-tokens", "0", "out of range"), ("--top-k", "-1", "out of range"),
])
def test_numbers_that_are_not_finite_or_overflow(capsys, flag, value, needle):
    code = main(["generate", "--prompt", "hi", flag, value])
    line = one_line_error(capsys, code, needle)
    assert f"argument {flag}" in line


def test_answer_file_numbers_must_be_finite(tmp_path, capsys):
    rec = {"question_id": 1, "choices": [{"index": 0, "turns": ["a"], "new_tokens": [3], "wall_time": [float("nan")]}]}
    a = tmp_path / "a.jsonl"
    a.write_text(json.dumps(rec) + "\n")  # json writes NaN, and json.loads reads it back
    one_line_error(capsys, main(["report", str(a), "--baseline", str(a)]), "'wall_time' must be a list of finite")


@pytest.mark.parametrize("choice, meta, needle", [
    ({"new_tokens": [10**400]}, None, "'new_tokens' must be a list of finite"),
    ({"idxs": [True]}, None, "'idxs' must be a list of finite"),
    ({"tokens": [["a"]]}, None, "'tokens' must be a list of integer lists"),
    ({}, {"temperature": "hot"}, "meta 'temperature' has the wrong type"),
    ({}, [1], "'meta' must be a JSON object"),
])
def test_answer_record_types(tmp_path, capsys, choice, meta, needle):
    rec = {"question_id": 1, "choices": [{"index": 0, "turns": ["a"], "new_tokens": [3], "idxs": [2],
                                          "wall_time": [1.0], **choice}]}
    if meta is not None:
        rec["meta"] = meta
    a = tmp_path / "a.jsonl"
    a.write_text(json.dumps(rec) + "\n")
    one_line_error(capsys, main(["report", str(a), "--baseline", str(a)]), needle)


# ---- resource sizes ----------------------------------------------------------------------------

def test_budget_is_capped():
    from ctc_drafter.cli.checks import MAX_BUDGET

    r = subprocess.run([sys.executable, "-m", "ctc_drafter", "generate", "--prompt", "hi", "--budget", "100000"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert f"argument --budget: 100000 is out of range: must be between 1 and {MAX_BUDGET}" in r.stderr


def test_max_new_tokens_is_capped_by_the_context(capsys, tiny_model_dir):
    # tiny_model_dir's context is 1024 tokens
    one_line_error(capsys, generate(tiny_model_dir, "--baseline", "--max-new-tokens", 10**9),
                   "more than the base's context (1024 tokens")


@pytest.mark.parametrize("flags, needle", [(["--bs", str(10**9)], "argument --bs"),
                                           (["--frames", "100000"], "num_frames must be between 1 and 64")])
def test_train_sizes_are_capped(tmp_path, capsys, tiny_model_dir, flags, needle):
    from ctc_drafter.models.base import load_base_model

    d = tmp_path / "data"
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"base": load_base_model(str(tiny_model_dir)).signature()}))
    code = main(["train", "--base-model", str(tiny_model_dir), "--data", str(d), "--out", str(tmp_path / "o"),
                 "--device", "cpu", *flags])
    one_line_error(capsys, code, needle)


# ---- devices -----------------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["mps", "xpu", "meta", "tpu", "cuda:99"])
@pytest.mark.parametrize("command", ["generate", "eval", "train", "distill"])
def test_devices_this_build_lacks(capsys, command, device):
    import torch

    if device.startswith("cuda") and torch.cuda.device_count() > 99:
        pytest.skip("a machine with 100 GPUs")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    required = {"generate": ["--prompt", "hi"],
                "eval": ["--bench", "mt_bench", "--question-file", "q", "--model-id", "m"],
                "train": ["--data", "d", "--out", "o"], "distill": ["--data", "d"]}[command]
    line = one_line_error(capsys, main([command, *required, "--device", device]), "argument --device")
    assert device in line


# ---- argparse's own errors ---------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["generate"], ["generate", "--prompt", "hi", "--tree-choices", "nope"],
                                  ["eval", "--bench", "mmlu"], ["report"], ["train", "--epochs", "x"],
                                  ["distill", "--mode", "nope", "--data", "x"], ["nope"], []])
def test_argparse_errors_have_the_one_prefix(capsys, argv):
    one_line_error(capsys, main(argv), "")


def test_argparse_errors_in_a_subprocess():
    r = subprocess.run([sys.executable, "-m", "ctc_drafter", "report", "--json"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("ctc-drafter: error: the following arguments are required")
    assert r.stderr.count("\n") == 1 and "ctc-drafter report: error" not in r.stderr


# ---- a base folder with its own code -----------------------------------------------------------

def test_base_with_custom_code_needs_trust_remote_code(tmp_path, capsys):
    d = tmp_path / "custom"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "my_own_lm",
                                               "auto_map": {"AutoModelForCausalLM": "modeling_mine.MyLM"}}))
    code = main(["generate", "--base-model", str(d), "--prompt", "hi", "--json"])
    out = capsys.readouterr()
    assert code == 2 and out.out == ""  # nothing on stdout: no question to answer, --json stays parseable
    assert out.err.startswith("ctc-drafter: error:") and "--trust-remote-code" in out.err
    assert out.err.count("\n") == 1
    for argv in (["report", "a", "--baseline", "b", "--tokenizer", str(d)],
                 ["train", "--base-model", str(d), "--data", "x", "--out", "o"]):
        one_line_error(capsys, main(argv), "--trust-remote-code")


# ---- train on an incomplete distill folder -----------------------------------------------------

def _distilled(tmp_path, tiny_model_dir, manifest_extra: dict, shards: int = 2) -> Path:
    import torch

    from ctc_drafter.data.shards import Sequence, shard_name, write_manifest, write_shard
    from ctc_drafter.models.base import load_base_model

    base = load_base_model(str(tiny_model_dir), device="cpu")
    d = tmp_path / "data"
    d.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(shards):
        ids = torch.randint(0, 200, (16,), generator=g)
        write_shard(d / shard_name(i), [Sequence(ids, ids.roll(-1), torch.arange(16) >= 8)])
    write_manifest(d, {"base": base.signature(), "records": 4, "shard_size": 1,
                       "shards": [{"file": shard_name(i)} for i in range(shards)], **manifest_extra})
    return d


def _train(tiny_model_dir, data, out, *extra):
    return main(["train", "--base-model", str(tiny_model_dir), "--data", str(data), "--out", str(out),
                 "--device", "cpu", "--epochs", "1", "--frames", "4", "--label-len", "3", "--positions", "4",
                 "--bs", "1", "--eval-frac", "0", *extra])


def test_train_refuses_an_unfinished_distill_run(tmp_path, capsys, tiny_model_dir):
    d = _distilled(tmp_path, tiny_model_dir, {"complete": False})
    line = one_line_error(capsys, _train(tiny_model_dir, d, tmp_path / "o"), "unfinished distill run")
    assert "2 of about 4 shards" in line and "--allow-incomplete" in line
    assert not (tmp_path / "o").exists()
    assert _train(tiny_model_dir, d, tmp_path / "o", "--allow-incomplete") == 0
    err = capsys.readouterr().err
    assert "ctc-drafter: warning:" in err and "training on the 2 shard(s) present" in err
    assert (tmp_path / "o" / "model.safetensors").is_file()


def test_train_refuses_a_folder_with_a_shard_missing(tmp_path, capsys, tiny_model_dir):
    d = _distilled(tmp_path, tiny_model_dir, {"complete": True})
    (d / "shard_00001.safetensors").unlink()
    one_line_error(capsys, _train(tiny_model_dir, d, tmp_path / "o"), "lacks 1 of its 2 shards (shard_00001")


# ---- file-system faults in the middle of a run -------------------------------------------------

def _eval(tiny_model_dir, answer_dir, *extra):
    return main(["eval", "--bench", "mt_bench", "--question-file", str(MT_BENCH), "--question-end", "3",
                 "--base-model", str(tiny_model_dir), "--baseline", "--model-id", "m", "--answer-dir", str(answer_dir),
                 "--max-new-tokens", "3", "--device", "cpu", "--no-progress", *extra])


def _fail_on_call(n: int, err: int, what=None):
    """A stand-in that raises OSError(err) from its n-th call on, and calls `what` before that."""
    calls = {"n": 0}

    def f(*a, **k):
        calls["n"] += 1
        if calls["n"] >= n:
            raise OSError(err, os.strerror(err))
        return what(*a, **k) if what else None
    return f


def test_eval_disk_full_mid_run_keeps_the_answers(tmp_path, capsys, tiny_model_dir, monkeypatch):
    from ctc_drafter.evaluation import eval as E

    monkeypatch.setattr(E, "append_answer", _fail_on_call(2, errno.ENOSPC, E.append_answer))  # the 2nd answer
    line = one_line_error(capsys, _eval(tiny_model_dir, tmp_path), "No space left on device", mid_run=True)
    answers = tmp_path / "m.jsonl"
    assert str(answers) in line and "the 1 answer(s) written before are kept" in line
    monkeypatch.undo()
    kept = [json.loads(x) for x in answers.read_text().splitlines() if x.strip().startswith("{")]
    assert kept[0]["question_id"] == 81
    assert _eval(tiny_model_dir, tmp_path) == 0  # the rerun answers the rest
    assert [json.loads(x)["question_id"] for x in answers.read_text().splitlines()] == [81, 82, 91]
    assert "1 question(s) already answered" in capsys.readouterr().err


def test_eval_read_only_folder_when_tidying(tmp_path, capsys, tiny_model_dir, monkeypatch):
    from ctc_drafter.evaluation import answer_files as E  # reorganize_answer_file tidies

    monkeypatch.setattr(E.tempfile, "mkstemp", _fail_on_call(1, errno.EROFS))
    line = one_line_error(capsys, _eval(tiny_model_dir, tmp_path), "Read-only file system", mid_run=True)
    assert "the 3 answer(s) written before are kept" in line
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 3


@pytest.mark.parametrize("content", [b"my notes\nsecond line\n\xff\xfe", b"\x89PNG\r\x1a one line, no newline",
                                     b'{"question_id": 81, "choices": []}\nnot a cut record'])
def test_eval_will_not_rewrite_a_file_that_is_not_an_answer_file(tmp_path, capsys, tiny_model_dir, content):
    notes = tmp_path / "m.jsonl"
    notes.write_bytes(content)
    before = notes.read_bytes()
    one_line_error(capsys, _eval(tiny_model_dir, tmp_path), "is not an answer file")
    assert notes.read_bytes() == before


def test_answer_files_follow_the_umask(tmp_path, capsys, tiny_model_dir):
    old = os.umask(0o022)
    try:
        assert _eval(tiny_model_dir, tmp_path, "--question-end", "1") == 0
    finally:
        os.umask(old)
    assert (tmp_path / "m.jsonl").stat().st_mode & 0o777 == 0o644


def test_second_eval_on_one_answer_file_is_refused(tmp_path, capsys, tiny_model_dir):
    from ctc_drafter.evaluation.eval import answer_file_lock

    with answer_file_lock(tmp_path / "m.jsonl"):  # another eval holds the file
        line = one_line_error(capsys, _eval(tiny_model_dir, tmp_path), "another `ctc-drafter eval` is writing")
    assert "m.jsonl" in line and not (tmp_path / "m.jsonl").exists()
    assert _eval(tiny_model_dir, tmp_path, "--question-end", "1") == 0  # released


def test_lock_is_held_across_processes(tmp_path, capsys, tiny_model_dir):
    lock = tmp_path / ".m.jsonl.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
                               "os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); "
                               "time.sleep(120)", str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        one_line_error(capsys, _eval(tiny_model_dir, tmp_path), "another `ctc-drafter eval` is writing")
    finally:
        holder.kill()
        holder.wait()
    fd = os.open(lock, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again once the holder is gone
    os.close(fd)


def test_train_out_disk_full_keeps_finished_epochs(tmp_path, capsys, tiny_model_dir, monkeypatch):
    from ctc_drafter.training import trainer as T  # Trainer.save_epoch publishes the draft

    d = _distilled(tmp_path, tiny_model_dir, {"complete": True})
    out = tmp_path / "ckpt"
    real = T.publish_top_level
    calls = {"n": 0}

    def full_on_epoch_2(epoch_dir, o):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(o / "model.safetensors.tmp"))
        return real(epoch_dir, o)

    monkeypatch.setattr(T, "publish_top_level", full_on_epoch_2)
    code = _train(tiny_model_dir, d, out, "--epochs", "2")
    line = one_line_error(capsys, code, "No space left on device", mid_run=True)
    assert f"cannot write the training run in {out}" in line
    assert "epochs 1..1 are kept (resume with --recover 1)" in line
    assert (out / "state_1" / "trainer_state.json").is_file() and (out / "epoch_1" / "model.safetensors").is_file()
    monkeypatch.undo()
    assert _train(tiny_model_dir, d, out, "--epochs", "2", "--recover", "1") == 0
    assert (out / "state_2").is_dir()


def test_distill_disk_full_mid_run_keeps_finished_shards(tmp_path, capsys, tiny_model_dir, monkeypatch):
    import safetensors.torch

    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": f"It is {2 * i}."}) + "\n"
                            for i in range(3)))
    monkeypatch.setattr(safetensors.torch, "save_file", _fail_on_call(2, errno.ENOSPC, safetensors.torch.save_file))
    out = tmp_path / "d"
    argv = ["distill", "--base-model", str(tiny_model_dir), "--data", str(data), "--out", str(out), "--device", "cpu",
            "--mode", "teacher-forced", "--shard-size", "1", "--json"]
    line = one_line_error(capsys, main(argv), "No space left on device", mid_run=True)
    assert "shard_00001.safetensors" in line
    assert (out / "shard_00000.safetensors").is_file() and not (out / "shard_00001.safetensors.tmp").exists()
    monkeypatch.undo()
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["shards"] == 3


def test_report_plot_on_a_full_disk(tmp_path, capsys, monkeypatch):
    import matplotlib.figure

    rec = {"question_id": 1, "choices": [{"index": 0, "turns": ["a"], "new_tokens": [3], "idxs": [2],
                                          "wall_time": [1.0]}]}
    a = tmp_path / "a.jsonl"
    a.write_text(json.dumps(rec) + "\n")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", _fail_on_call(1, errno.ENOSPC))
    plot = tmp_path / "plots" / "r.png"
    line = one_line_error(capsys, main(["report", str(a), "--baseline", str(a), "--plot", str(plot)]),
                          "No space left on device")
    assert f"cannot write the plot {plot}" in line and not list(plot.parent.iterdir())
    one_line_error(capsys, main(["report", str(a), "--baseline", str(a), "--plot", str(tmp_path / "r.xyz")]),
                   "cannot write .xyz files")


def test_report_notes_a_repeated_question_id(tmp_path, capsys):
    recs = [{"question_id": q, "choices": [{"index": 0, "turns": [t], "new_tokens": [3], "idxs": [2],
                                            "wall_time": [1.0]}]} for q, t in ((1, "first"), (2, "x"), (1, "second"))]
    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(["report", str(a), "--baseline", str(a), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["n_questions"] == 2
    assert any("1 repeated answer(s) to a question id (1); the last answer to each is used" in n for n in r["notes"])
