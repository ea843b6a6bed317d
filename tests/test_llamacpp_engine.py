"""llama.cpp's own greedy as a reference row (issue 33 item 5): through `eval --engine llamacpp`, `demo` and
scripts/benchmark.py when llama-cpp-python is installed; one line saying it was skipped when it is not.

The rows themselves run the real llama.cpp on the GGUF the embedded default comes from (skipped where
llama_cpp is not importable); the absence tests hide the package, so they run on every machine."""

import json
import sys
import types
from pathlib import Path

import pytest

from conftest import load_script
from ctc_drafter.cli.main import main
from ctc_drafter.evaluation.llamacpp_engine import llama_cpp_missing

DATA = Path(__file__).parent / "data"
needs_llama = pytest.mark.skipif(bool(llama_cpp_missing()), reason="llama-cpp-python is not installed")


@pytest.fixture
def no_llama_cpp(monkeypatch):
    """As on a machine without llama-cpp-python: `import llama_cpp` raises ImportError."""
    monkeypatch.setitem(sys.modules, "llama_cpp", None)


def _bench_args(**kw):
    return types.SimpleNamespace(**{"base_model": "default", "only": None, "threads": "2", "dtypes": "auto",
                                    "budget": None, "medusa_budget": None, "ctc_draft": "d", "ce_draft": None,
                                    "cpu_kernels": "auto", **kw})


def test_without_llama_cpp_each_place_says_so_in_one_line(no_llama_cpp, tmp_path, capsys):
    assert "pip install llama-cpp-python" in llama_cpp_missing()
    bm = load_script("benchmark")
    rows, line = bm.llama_row(_bench_args())
    assert rows == [] and bm.LLAMA_ROW not in [n for n, _ in bm.methods(_bench_args())]
    assert line == "llamacpp-greedy reference row skipped: llama_cpp is not importable (pip install " \
                   "llama-cpp-python (README, optional extras))"
    from ctc_drafter.cli import demo

    d = types.SimpleNamespace(base=types.SimpleNamespace(device=types.SimpleNamespace(type="cpu")))
    engine, line = demo._llama_reference(types.SimpleNamespace(temperature=0.0, base_model="default"), d)
    assert engine is None and line.startswith("llama.cpp reference row skipped: llama_cpp is not importable")
    code = main(["eval", "--bench", "mt_bench", "--question-file", str(DATA / "mt_bench_question.jsonl"),
                 "--model-id", "l", "--answer-dir", str(tmp_path), "--engine", "llamacpp", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--engine llamacpp: llama_cpp is not importable" in err and "Traceback" not in err


def test_a_base_without_a_gguf_has_no_llama_row():
    bm = load_script("benchmark")
    rows, line = bm.llama_row(_bench_args(base_model="/some/hf-folder"))
    assert rows == [] and ("is not a GGUF" in line or "not importable" in line)


@needs_llama
def test_llama_cpp_greedy_follows_the_base_on_the_same_prompt_ids():
    import torch

    from ctc_drafter.evaluation.llamacpp_engine import LlamaCppEngine, gguf_for
    from ctc_drafter.models import load_base_model
    from ctc_drafter.models.templates import build_prompt_ids

    base = load_base_model("default", device="cpu", dtype=torch.float32)
    llama = LlamaCppEngine(base, gguf_for("default"), threads=1)
    assert llama.weights == "Q4_1"
    prompt = "Write a short Python function that returns the factorial of n."
    res = llama.chat(prompt, max_new_tokens=16)
    assert len(res.tokens) == 16 and res.steps == 16 and res.wall_s > 0 and res.text.strip()
    # The same weights (our copy is the dequantised Q4_1 GGUF) but llama.cpp rounds its activations to
    # 8 bits, so near-ties may flip; each of its tokens is still among the base's top 3 after the same ids
    # (a shifted or re-templated prompt would not be)
    ids = build_prompt_ids(base.tokenizer, [{"role": "user", "content": prompt}])
    logits = base.model(torch.tensor([ids + res.tokens])).logits[0, len(ids) - 1:-1]  # [16, V]
    ranks = [(row > row[t]).sum().item() for row, t in zip(logits, res.tokens)]
    assert max(ranks) < 3, ranks
    assert llama.chat(prompt, max_new_tokens=16).tokens == res.tokens  # a second request starts afresh
    with pytest.raises(Exception, match="greedily"):
        llama.chat(prompt, max_new_tokens=4, temperature=0.7)


@needs_llama
def test_eval_and_benchmark_carry_the_llama_row(tmp_path, capsys):
    bm = load_script("benchmark")
    assert (bm.LLAMA_ROW, ["--engine", "llamacpp", "--threads", "2"]) in bm.methods(_bench_args())
    code = main(["eval", "--bench", "mt_bench", "--question-file", str(DATA / "mt_bench_question.jsonl"),
                 "--question-end", "1", "--model-id", "llamacpp-greedy", "--answer-dir", str(tmp_path),
                 "--engine", "llamacpp", "--threads", "1", "--max-new-tokens", "6", "--no-progress"])
    assert code == 0
    capsys.readouterr()
    (r,) = [json.loads(x) for x in (tmp_path / "llamacpp-greedy.jsonl").read_text().splitlines()]
    m = r["meta"]
    assert m["engine"] == "llamacpp" and m["dtype"] == "Q4_1" and m["kernels"] == "llama.cpp, 1 threads"
    assert m["speculative"] is False
    (c,) = r["choices"]
    assert all(0 < n <= 6 for n in c["new_tokens"]) and all(t > 0 for t in c["wall_time"])
    # the report compares it with HF generate like any other answer file, and names the engine
    common = ["--bench", "mt_bench", "--question-file", str(DATA / "mt_bench_question.jsonl"), "--question-end", "1",
              "--answer-dir", str(tmp_path), "--max-new-tokens", "6", "--no-progress", "--dtype", "float32"]
    assert main(["eval", *common, "--model-id", "hf", "--engine", "hf"]) == 0
    assert main(["report", str(tmp_path / "llamacpp-greedy.jsonl"), "--baseline", str(tmp_path / "hf.jsonl"),
                 "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["engines"]["spec"] == "llama.cpp greedy (Q4_1 GGUF, llama.cpp, 1 threads)" and rep["n_questions"] == 1
