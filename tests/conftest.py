"""Shared fixtures: tiny random Llama bases (with SmolLM2's real tokenizer) for fast CPU tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from ctc_drafter.models.base import BaseModel
from ctc_drafter.testing import tiny_llama  # noqa: F401 - one builder for tests and scripts/gpu_check.py


def load_script(name: str):
    """scripts/<name>.py as a module (the scripts are not a package)."""
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_script", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# Tiny bases of the other architectures the README names, each with what sets it apart from Llama.
# Windows are smaller than the tests' contexts, so tokens do fall out of them.
TINY_ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 5}),  # every layer slides
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",  # q/k/v biases; layer 0 full, layer 1 sliding
              {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",  # logit soft-capping after the head; sliding + full
               {"sliding_window": 5, "final_logit_softcapping": 1.5, "attn_logit_softcapping": 20.0,
                "head_dim": 8, "query_pre_attn_scalar": 8}),
}


def interrupt_on_call(monkeypatch, module, name: str, n: int) -> None:
    """Replace module.name so that its n-th call raises KeyboardInterrupt (a Ctrl-C mid-run); the other
    calls go through. Undo with monkeypatch.undo() or by setting the attribute back."""
    real, calls = getattr(module, name), {"n": 0}

    def interrupting(*a, **kw):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(module, name, interrupting)


def tiny_arch(arch: str, vocab_size=64, hidden=32, layers=2, dtype=torch.float64, seed=0, max_pos=512):
    """A tiny random base of `arch` (a TINY_ARCHS key), shaped like tiny_llama."""
    import transformers

    config_cls, model_cls, extra = TINY_ARCHS[arch]
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos, bos_token_id=0,
        eos_token_id=None, pad_token_id=None, tie_word_embeddings=False, **extra)
    return getattr(transformers, model_cls)(cfg).to(dtype).eval()


class FirstArm:
    """A speculation switch that always takes the first arm (the proposer's full mode). The real switch
    (decoding/switch.py) decides by wall time, which would make step counts depend on the machine's load:
    tests that count steps pass this one through the engine's `switch` parameter."""

    def __init__(self, arms):
        self.arm = arms[0]

    def choose(self) -> str:
        return self.arm

    def record(self, arm, tokens, seconds) -> None:
        pass


@pytest.fixture(scope="session")
def first_arm():
    """The engine's `switch=` for tests that count steps: every step takes the first arm."""
    return FirstArm


@pytest.fixture
def toy_base():
    """A float64 tiny Llama (vocab 64, no tokenizer, no EOS): for exactness tests on token ids."""
    return BaseModel(tiny_llama(), None, "toy")


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2's real tokenizer (chat template included), from the converted embedded default."""
    from transformers import AutoTokenizer

    from ctc_drafter.models.base import default_model_dir

    return AutoTokenizer.from_pretrained(default_model_dir())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer):
    """A local HF folder: tiny random Llama with SmolLM2's vocabulary and tokenizer (loads like a user's model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = smol_tokenizer
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("tiny-smol")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d
