"""oneDNN packed-weight linear layers (models/cpu_kernels.py): same model up to float rounding, still lossless."""

import copy

import pytest
import torch
from torch import nn

from conftest import tiny_llama
from ctc_drafter.decoding import CTCDrafter
from ctc_drafter.draft import new_draft_for
from ctc_drafter.models.base import BaseModel
from ctc_drafter.models.cpu_kernels import PackedLinear, pack_linears, packed_linear_available

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
    longest = 1
    for trial in range(3):
        drafter = CTCDrafter(base, new_draft_for(base, seed=trial), generator=generator, budget=budget)
        assert drafter.kernels == "packed"
        ids = torch.randint(0, 64, (1, 5 + trial), generator=torch.Generator().manual_seed(trial))
        spec = drafter.generate(ids, max_new_tokens=30)
        van = drafter.generate(ids, max_new_tokens=30, speculative=False)
        hf = stock.generate(ids, max_new_tokens=30, do_sample=False, attention_mask=torch.ones_like(ids))
        assert spec.tokens == van.tokens == hf[0, ids.shape[1]:].tolist()
        longest = max(longest, max(spec.accept_lengths))
    assert longest > 1
