"""Helpers the test suite and scripts/gpu_check.py share (neither imports pytest from here): tiny random
Llama bases and fake CPUs, so that a test sets the hardware facts it depends on instead of reading the host's."""

from __future__ import annotations

import torch

from .models.cpu_info import CPU

# The three kinds of CPU whose facts change a choice (models/cpu_info.py): bf16 by default and a probed
# tree row limit with AMX; bf16 training only with AVX512-BF16 alone; fp32 everywhere with neither.
FAKE_CPUS = {
    "amx": CPU("fake Intel Xeon with AMX", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})),
    "avx512_bf16": CPU("fake AMD EPYC with AVX512-BF16", frozenset({"avx2", "avx512f", "avx512_bf16"})),
    "neither": CPU("fake x86-64 without bf16 units", frozenset({"avx2"})),
}


def tiny_llama(vocab_size=64, hidden=32, layers=2, dtype=torch.float64, seed=0, max_pos=512):
    """A random LlamaForCausalLM small enough for a CPU test (eval mode; no EOS, so it never stops early)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
                      bos_token_id=0, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(dtype).eval()
