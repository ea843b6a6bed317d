"""scripts/pass_cost.py: the per-pass cost grid of each engine, its output files, and the compiled
gpt-fast-style engine (models/static_llama.py) computing what the HF model computes."""

import csv
import json

import pytest
import torch

from conftest import load_script
from ctc_drafter.models.static_llama import StaticLlama
from ctc_drafter.testing import tiny_llama


def test_torch_grid_on_a_tiny_base(tmp_path, tiny_model_dir):
    pc = load_script("pass_cost")
    out = tmp_path / "pc"
    sizes = [1, 4, 64]
    pc.main(["--base-model", str(tiny_model_dir), "--engines", "eager-fp32,llama-q4_1", "--threads", "1",
             "--past", "8,40", "--sizes", ",".join(map(str, sizes)), "--reps", "3", "--out", str(out)])
    data = json.loads((out / "cells.json").read_text())
    cells = data["cells"]
    assert {(c["past"], c["n"]) for c in cells} == {(p, n) for p in (8, 40) for n in sizes}  # the whole grid
    assert all(c["engine"] == "eager-fp32" and c["threads"] == 1 and c["reps"] == 3 for c in cells)
    assert all(0 < c["ms_min"] <= c["ms"] for c in cells)
    # a 64-token pass computes 64 rows of logits over SmolLM2's 49k-token vocabulary: never cheaper than one token
    for past in (8, 40):
        ms = {c["n"]: c["ms"] for c in cells if c["past"] == past}
        assert ms[64] > ms[1]
    # the llama engine is not for a base other than the embedded default: skipped with the reason
    assert "skipped" in data["meta"]["engines"]["1"]["llama-q4_1"]
    rows = list(csv.DictReader(open(out / "cells.csv")))
    assert len(rows) == len(cells) and (out / "pass_cost.png").stat().st_size > 0


def test_outlook_is_the_speedup_over_llama_cpp_greedy_the_pass_costs_allow():
    pc = load_script("pass_cost")
    cells = [{"engine": "llama-q4_1", "threads": 1, "past": 256, "n": 1, "ms": 20.0},
             {"engine": "llama-q4_1", "threads": 1, "past": 256, "n": 4, "ms": 50.0},
             {"engine": "compiled-int8", "threads": 1, "past": 256, "n": 4, "ms": 25.0},
             {"engine": "eager-fp32", "threads": 2, "past": 256, "n": 4, "ms": 30.0}]  # no llama row at 2 threads
    text = pc.outlook(cells, beta=2.5, nodes=4, overhead_ms=8.0)
    rows = [line for line in text.splitlines() if line.startswith("| 1 ")]
    # needed: 2.5 * 20 / 1.5 - 8 = 25.3 ms; compiled-int8: 2.5 * 20 / (25 + 8) = 1.52x; llama's own tree: 0.86x
    assert rows == ["| 1 | 256 | 20.0 | 25.3 | 0.86x | 1.52x | - |"]
    assert pc.outlook(cells[2:], beta=2.5, nodes=4, overhead_ms=8.0) == ""  # nothing to compare with


def test_bad_grid_is_one_clear_error(capsys):
    pc = load_script("pass_cost")
    for argv in (["--engines", "eager-fp64"], ["--sizes", "1,x"], ["--past", "0"]):
        with pytest.raises(SystemExit) as e:
            pc.parse_args(argv)
        assert e.value.code == 2
    assert "unknown eager-fp64" in capsys.readouterr().err


@pytest.mark.parametrize("quant,dtype,tol", [(None, torch.float32, 1e-5), ("int8", torch.bfloat16, 0.1),
                                              ("int4", torch.bfloat16, 0.3)])
def test_static_llama_computes_the_hf_models_logits(quant, dtype, tol):
    hf = tiny_llama(vocab_size=64, hidden=64, layers=2, dtype=torch.float32)
    ids = torch.randint(0, 64, (1, 20), generator=torch.Generator().manual_seed(0))
    ref = hf(ids).logits  # [1,20,64]
    m = StaticLlama(hf, max_len=24, dtype=dtype, quant=quant)
    got = torch.cat([m.prefill(ids[:, :12]), m(ids[:, 12:17], torch.arange(12, 17), eager=True)], 1)
    # rows 17.. of the cache were never written, rows 12..16 again: a pass of other tokens at the same
    # positions overwrites them (the past stays fixed, as the cost grid needs)
    m(ids[:, 5:8], torch.arange(12, 15), eager=True)
    again = m(ids[:, 12:17], torch.arange(12, 17), eager=True)
    assert (got - ref[:, :17]).abs().max() < tol
    assert torch.equal(again, got[:, 12:17])
    if quant:  # the kernel multiplies by the weights it stored
        lin = m.layers[0].w13
        for rows in (3, 80):  # 80: more than DENSE_ROWS, a long prefill's dense product of the same weights
            x = torch.randn(rows, 64, dtype=dtype)
            assert torch.allclose(lin(x).float(), x.float() @ lin.dequantized().T, atol=5e-3, rtol=2e-2)


@pytest.mark.slow
def test_compiled_static_llama_matches_eager():
    hf = tiny_llama(vocab_size=64, hidden=64, layers=2, dtype=torch.float32)
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(1))
    m = StaticLlama(hf, max_len=16).compile()
    m.prefill(ids[:, :8])
    for n in (1, 4):
        eager = m(ids[:, 8:8 + n], torch.arange(8, 8 + n), eager=True)
        assert torch.allclose(m(ids[:, 8:8 + n], torch.arange(8, 8 + n)), eager, atol=1e-5)


def test_prefill_cost_script_reads_each_prompt_on_each_engine(tiny_model_dir, tmp_path, capsys):
    q = tmp_path / "q.jsonl"
    q.write_text('{"turns": ["Tell me about cats."]}\n{"turns": []}\n{"turns": ["' + "word " * 80 + '"]}\n')
    load_script("prefill_cost").main(["--question-file", str(q), "--base-model", str(tiny_model_dir),
                                      "--engines", "backend-int4,torch", "--reps", "1"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("2 prompts")  # the record without turns is skipped
    rows = {ln.split("|")[1].strip(): float(ln.split("|")[2]) for ln in out[3:]}
    assert set(rows) == {"backend-int4", "torch"} and all(v > 0 for v in rows.values())
    with pytest.raises(SystemExit):
        load_script("prefill_cost").main(["--question-file", str(q), "--engines", "vllm"])
