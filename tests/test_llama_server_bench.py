"""scripts/llama_server_bench.py: its modes, its table over server timings, its run against a stand-in server
(rotation per prompt, answers compared with llama-server alone's), clean errors; and a short run against a real
llama-server when $LLAMA_SERVER names one."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_script

from ctc_drafter.errors import CTCDrafterError

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lsb():
    return load_script("llama_server_bench")


def test_modes_put_alone_first_and_give_each_its_server_arguments(lsb):
    modes = lsb.parse_modes("draft-eagle3,ngram-mod", "d.gguf", 4)
    assert [m.name for m in modes] == ["none", "draft-eagle3", "ngram-mod"]
    assert modes[0].args == []
    assert modes[1].args == ["-md", "d.gguf", "--spec-type", "draft-eagle3", "--spec-draft-n-max", "4"]
    assert modes[2].args == ["--spec-type", "ngram-mod", "--spec-draft-n-max", "4"]
    assert lsb.parse_modes("ngram-simple", None, None)[1].args == ["--spec-type", "ngram-simple"]
    for bad, draft in (("ngram-bogus", None), ("draft-eagle3", None), ("none,none", None)):
        with pytest.raises(CTCDrafterError):
            lsb.parse_modes(bad, draft, None)
    assert lsb.parse_threads("1,2") == [1, 2]
    for bad in ("0", "a", ""):
        with pytest.raises(CTCDrafterError):
            lsb.parse_threads(bad)


def test_summary_of_server_timings(lsb):
    rows = json.loads((DATA / "llama_server_rows.json").read_text())["rows"]
    s = {x["mode"]: x for x in lsb.summarize(rows)}
    assert lsb.summarize(rows)[0]["mode"] == "none"
    assert s["none"]["server_tok_s"] == pytest.approx(40.0) and s["none"]["acceptance"] is None
    assert s["none"]["identical"] == 2
    # ngram-mod drafted on one prompt only (the server omits draft_n when it drafted nothing)
    assert (s["ngram-mod"]["draft_n"], s["ngram-mod"]["draft_n_accepted"]) == (6, 3)
    assert s["ngram-mod"]["speedup"] == pytest.approx(1.0)
    assert s["draft-eagle3"]["server_tok_s"] == pytest.approx(80.0) and s["draft-eagle3"]["speedup"] == pytest.approx(2)
    assert s["draft-eagle3"]["acceptance"] == pytest.approx(0.5)
    assert s["draft-eagle3"]["identical"] == 1  # its second answer differs from alone's in the last token
    assert "| 1 | draft-eagle3 | 80.0 | 40.0 | 2.00× | 12 | 6 | 50.0% | 1/2 |" in lsb.table(lsb.summarize(rows))


def _fake_server(tmp_path):
    exe = tmp_path / "llama-server"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} {DATA / 'fake_llama_server.py'} \"$@\"\n")
    exe.chmod(0o755)
    return exe


def _prompts(tmp_path, n):
    f = tmp_path / "q.jsonl"
    f.write_text("".join(json.dumps({"question_id": f"q{i}", "turns": [f"question {i}"]}) + "\n" for i in range(n)))
    return f


def test_a_run_interleaves_modes_and_compares_with_alone(lsb, tmp_path, monkeypatch, capsys):
    log = tmp_path / "requests.log"
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("FAKE_DIVERGE", "ngram-simple")
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    (tmp_path / "draft.gguf").write_bytes(b"GGUF")
    out = tmp_path / "bench.json"
    lsb.main(["--server", str(_fake_server(tmp_path)), "--model", str(tmp_path / "model.gguf"),
              "--draft", str(tmp_path / "draft.gguf"), "--modes", "ngram-simple,draft-eagle3",
              "--prompts", str(_prompts(tmp_path, 3)), "--n-predict", "6", "--out", str(out)])
    timed = [ln.split(" ", 2) for ln in log.read_text().splitlines() if "Hello" not in ln]
    order = [[t[1] for t in timed[i * 3:(i + 1) * 3]] for i in range(3)]
    assert order == [["none", "ngram-simple", "draft-eagle3"], ["ngram-simple", "draft-eagle3", "none"],
                     ["draft-eagle3", "none", "ngram-simple"]]
    assert all(t[2] == f"<user>question {i // 3}<assistant>" for i, t in enumerate(timed))  # the same prompt text
    s = {x["mode"]: x for x in json.loads(out.read_text())["summary"]}
    assert s["ngram-simple"]["identical"] == 0 and s["draft-eagle3"]["identical"] == 3
    assert s["draft-eagle3"]["acceptance"] == pytest.approx(0.5) and s["draft-eagle3"]["speedup"] == pytest.approx(2)
    assert "| 1 | draft-eagle3 |" in capsys.readouterr().out


def _script(*args, env=None):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "llama_server_bench.py"), *args],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def test_missing_binary_or_failed_start_is_one_clean_line(tmp_path):
    q = _prompts(tmp_path, 1)
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    r = _script("--server", str(tmp_path / "nope"), "--model", str(tmp_path / "model.gguf"), "--prompts", str(q),
                "--modes", "none")
    assert r.returncode != 0 and r.stderr.startswith("error: llama-server binary not found")
    assert len(r.stderr.strip().splitlines()) == 1
    # a draft the script cannot find is named before any server starts
    r = _script("--server", str(_fake_server(tmp_path)), "--model", str(tmp_path / "model.gguf"), "--prompts", str(q),
                "--modes", "draft-eagle3", "--draft", str(tmp_path / "missing.gguf"))
    assert r.returncode != 0 and r.stderr.strip() == f"error: draft not found: {tmp_path / 'missing.gguf'}"
    # a server that exits at start: its last log line, on one line
    r = _script("--server", str(_fake_server(tmp_path)), "--model", str(tmp_path / "model.gguf"), "--prompts", str(q),
                "--modes", "draft-eagle3", "--draft", str(tmp_path / "model.gguf"), "--out", str(tmp_path / "b.json"),
                env={"FAKE_FAIL_START": "draft-eagle3", "FAKE_LOG": str(tmp_path / "l.log")})
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("error: llama-server exited (1) at start: llama_model_load: error loading model")


def test_real_llama_server_alone_and_ngram_answer_alike(lsb, tmp_path):
    server = os.environ.get("LLAMA_SERVER") or shutil.which("llama-server")
    if not server:
        pytest.skip("no llama-server binary (set $LLAMA_SERVER to one built from llama.cpp)")
    from ctc_drafter.evaluation.llamacpp_engine import gguf_for

    model = gguf_for("default")
    if not model.is_file():
        pytest.skip(f"the embedded base's GGUF is absent: {model}")
    out = tmp_path / "b.json"
    lsb.main(["--server", server, "--model", str(model), "--modes", "none,ngram-simple", "--n-predict", "16",
              "--prompts", str(DATA / "arena_question_head6.jsonl"), "--limit", "2", "--out", str(out)])
    s = {x["mode"]: x for x in json.loads(out.read_text())["summary"]}
    assert s["none"]["tokens"] == 32 and s["ngram-simple"]["identical"] == 2
