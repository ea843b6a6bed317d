"""oneDNN packed-weight linear layers (models/cpu_kernels.py): same model up to float rounding, still lossless."""

import copy

import pytest
import torch
from torch import nn

from conftest import FirstArm, tiny_llama
from ctc_drafter.decoding import CTCDrafter
from ctc_drafter.draft import new_draft_for
from ctc_drafter.models.base import BaseModel
from ctc_drafter.models.cpu_kernels import PackedLinear, pack_linears, packed_linear_available
from ctc_drafter.testing import FAKE_CPUS

pytestmark = pytest.mark.skipif(not packed_linear_available(), reason="this PyTorch build has no oneDNN")


def test_packing_swaps_every_linear_and_keeps_the_logits():
    stock = tiny_llama(dtype=torch.float32, seed=4)
    packed = copy.deepcopy(stock)
    n_linear = sum(type(m) is nn.Linear for m in stock.modules())
    assert pack_linears(packed) == n_linear > 0
    assert not any(type(m) is nn.Linear for m in packed.modules())
    head = packed.get_output_embeddings()
    assert isinstance(head, PackedLinear) and head.weight is not None  # drafts read the head's rows
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = stock(ids).logits, packed(ids).logits
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_packing_leaves_other_dtypes_alone():
    model = tiny_llama(dtype=torch.float64)
    assert pack_linears(model) == 0
    assert sum(type(m) is nn.Linear for m in model.modules()) > 0


@pytest.mark.parametrize("generator,budget", [("beam", 4), ("medusa", 20)])
def test_greedy_with_packed_layers_equals_stock_hf_generate(generator, budget):
    stock = tiny_llama(dtype=torch.float32, seed=1)
    base = BaseModel(copy.deepcopy(stock), None, "toy")
    pack_linears(base.model)
    assert_swapped_kernels_lossless(base, stock, generator, budget, kernels="packed")


def assert_swapped_kernels_lossless(base, stock, generator, budget, kernels=None):
    """Greedy speculative == our vanilla == HF `generate` on the untouched `stock` copy, 3 random drafts,
    with multi-token acceptance exercised (shared by the kernel-choice tests)."""
    longest = 1
    for trial in range(3):
        drafter = CTCDrafter(base, new_draft_for(base, seed=trial), generator=generator, budget=budget,
                             proposer="ctc", switch=FirstArm)
        assert kernels is None or drafter.kernels == kernels
        ids = torch.randint(0, 64, (1, 5 + trial), generator=torch.Generator().manual_seed(trial))
        spec = drafter.generate(ids, max_new_tokens=30)
        van = drafter.generate(ids, max_new_tokens=30, speculative=False)
        hf = stock.generate(ids, max_new_tokens=30, do_sample=False, attention_mask=torch.ones_like(ids))
        assert spec.tokens == van.tokens == hf[0, ids.shape[1]:].tolist()
        longest = max(longest, max(spec.accept_lengths))
    assert longest > 1


# ---- bf16 on CPU: lossless with respect to HF `generate` on the same bf16 model ------------------

def hf_greedy(model, ids, n):
    return model.generate(ids, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids))[0, ids.shape[1]:].tolist()


def test_bf16_packed_layers_equal_stock_bit_for_bit():
    """In bf16 both kernels are oneDNN's: packing changes the speed, not one bit of the logits."""
    stock = tiny_llama(dtype=torch.bfloat16, seed=4, hidden=64)
    packed = copy.deepcopy(stock)
    assert pack_linears(packed) > 0
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(stock(ids).logits, packed(ids).logits)


def bf16_greedy_trials(attn, kernels, generator, budget, seeds=range(6)):
    """(spec, vanilla, HF) token lists per seed on tiny bf16 Llamas with the given attention back end."""
    out, longest = [], 1
    for seed in seeds:
        stock = tiny_llama(dtype=torch.bfloat16, seed=seed, hidden=64)
        stock.set_attn_implementation(attn)
        base = BaseModel(copy.deepcopy(stock), None, "toy")
        if kernels == "packed":
            pack_linears(base.model)
        drafter = CTCDrafter(base, new_draft_for(base, seed=seed), generator=generator, budget=budget,
                             proposer="ctc", switch=FirstArm)
        ids = torch.randint(0, 64, (1, 3 + seed), generator=torch.Generator().manual_seed(seed))
        spec = drafter.generate(ids, max_new_tokens=40)
        out.append((spec.tokens, drafter.generate(ids, max_new_tokens=40, speculative=False).tokens,
                    hf_greedy(stock, ids, 40)))
        longest = max(longest, max(spec.accept_lengths))
    assert longest > 1, "no step accepted a draft token: the multi-token path is untested"
    return out


@pytest.mark.parametrize("kernels", ["stock", "packed"])
def test_bf16_vanilla_loop_equals_hf_generate(kernels):
    """Our 1-token loop is HF `generate` on the same bf16 model, packed layers included."""
    for spec, van, hf in bf16_greedy_trials("sdpa", kernels, "prefix", 4):
        assert van == hf


@pytest.mark.parametrize("generator,budget", [("beam", 12), ("medusa", 64), ("prefix", 24)])
def test_bf16_speculative_equals_hf_generate(generator, budget):
    """Lossless in bf16: masked SDPA over past+n keys rounds a node's attention differently from a 1-token
    step over past+i keys (seed 2 flips a greedy token at 24 that way), so tree passes attend node by node
    (models/tree_attention.py). Without that, this test fails."""
    for spec, van, hf in bf16_greedy_trials("sdpa", "packed", generator, budget):
        assert spec == van == hf


@pytest.mark.parametrize("kind", FAKE_CPUS)
def test_dtype_auto_on_cpu_is_bf16_only_with_amx(kind):
    """auto: bf16 where the CPU has AMX (faster there, and exact against its own bf16 baseline), fp32
    elsewhere: with AVX512-BF16 alone an exact bf16 tree needs one row per linear call, and without
    either bf16 is emulated; an explicit choice always stands."""
    from ctc_drafter.models.base import resolve_dtype

    cpu, dev = FAKE_CPUS[kind], torch.device("cpu")
    want = torch.bfloat16 if kind == "amx" else torch.float32
    assert resolve_dtype("auto", dev, cpu) == want
    assert resolve_dtype(None, dev, cpu) == want
    assert resolve_dtype("float32", dev, cpu) == torch.float32
    assert resolve_dtype("bfloat16", dev, cpu) == torch.bfloat16
