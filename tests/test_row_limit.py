"""models/row_limit.py: a wide bf16 tree pass computes every node as the 1-token step does, even where the
CPU's linear kernel rounds a row differently once a call has more rows than it blocks together (on an
Intel Xeon with AMX: beyond 32 rows, scripts/row_invariance.py)."""

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_llama
from ctc_drafter.models.kv_cache import new_kv_cache
from ctc_drafter.decoding.tree import TokenTree
from ctc_drafter.models.base import BaseModel
from ctc_drafter.models.cpu_kernels import dispatch_linears, pack_linears, KernelPlan, PACKED, STOCK
from ctc_drafter.models.row_limit import linear_rows_at_most, row_invariant_rows
from ctc_drafter.testing import FAKE_CPUS


def rows_alone(fn, x):
    return torch.cat([fn(x[j:j + 1]) for j in range(x.shape[0])])


@pytest.mark.parametrize("kernels", ["stock", "packed"])
def test_split_calls_round_every_row_as_a_one_row_call(kernels):
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(576, 1536, bias=True).bfloat16()
    model = torch.nn.Sequential(lin)
    if kernels == "packed":
        assert pack_linears(model) == 1
    layer = model[0]
    x = torch.randn(70, 576, generator=g).bfloat16()
    alone = rows_alone(layer, x)
    with linear_rows_at_most(1):
        got = layer(x[None])  # [1,70,out]: the leading dims are kept
    assert got.shape == (1, 70, 1536)
    assert torch.equal(got[0], alone)
    with linear_rows_at_most(16):  # 16 + 16 + 16 + 16 + 6 rows, each block as its own call
        blocks = layer(x)
    assert torch.equal(blocks, torch.cat([layer(x[i:i + 16]) for i in range(0, 70, 16)]))


def test_the_measured_limit_is_a_size_the_kernels_round_row_invariantly():
    """Whatever this CPU's limit is, every call up to it agrees with the 1-row calls."""
    model = tiny_llama(vocab_size=4096, hidden=576, dtype=torch.bfloat16, seed=0)
    limit = row_invariant_rows(model, 80)
    assert 1 <= limit <= 80
    g = torch.Generator().manual_seed(1)
    for lin in (model.lm_head, model.model.layers[0].mlp.down_proj):
        x = torch.randn(limit, lin.in_features, generator=g).bfloat16()
        assert torch.equal(lin(x), rows_alone(lin, x))


@pytest.mark.parametrize("kernels", ["stock", "packed", "mixed"])
def test_a_wide_bf16_tree_pass_is_the_one_token_steps_bit_for_bit(kernels):
    """A 64-node chain in one tree pass: every node's logits and hidden state equal those of feeding
    the path one token at a time. SmolLM2-sized layers (hidden 576), where this CPU's kernels round
    differently beyond 32 rows."""
    model = tiny_llama(vocab_size=4096, hidden=576, dtype=torch.bfloat16, seed=3)
    base = BaseModel(model, None, "toy")
    if kernels == "packed":
        pack_linears(model)
    elif kernels == "mixed":
        dispatch_linears(model, KernelPlan([(1, STOCK), (64, PACKED)]))
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 4096, (1, 9), generator=g)
    tokens = torch.randint(0, 4096, (64,), generator=g).tolist()

    cache = new_kv_cache(base)
    base.forward(prompt, cache)
    tree = TokenTree(tokens, [-1] + list(range(63)))
    ids, pos, mask = tree.verify_inputs(cache.get_seq_length(), "cpu", torch.bfloat16)
    hidden, logits = base.forward(ids, cache, position_ids=pos, attention_mask=mask)

    ref_cache = new_kv_cache(base)
    base.forward(prompt, ref_cache)
    for i, t in enumerate(tokens):
        h, lg = base.forward(torch.tensor([[t]]), ref_cache)
        assert torch.equal(lg[0, -1], logits[0, i]), f"node {i}: logits"
        assert torch.equal(h[0, -1], hidden[0, i]), f"node {i}: hidden state"


@pytest.mark.parametrize("kind", FAKE_CPUS)
def test_without_amx_every_tree_call_takes_one_row(monkeypatch, kind):
    """On AVX512-BF16 without AMX (an AMD EPYC) a 6-row bf16 linear call rounded one near-tie output apart
    from the 1-row call, and no random probe found it: there no size is trusted, whatever a probe says.
    With AMX the probe decides: a probe that finds every size invariant leaves one call (None), one that
    finds 4 rows invariant splits wider passes into calls of 4 rows."""
    from ctc_drafter.models import base as base_module

    model = tiny_llama(vocab_size=256, hidden=64, dtype=torch.bfloat16, seed=0)
    probed = []
    monkeypatch.setattr(base_module, "row_invariant_rows", lambda model, up_to: probed.append(up_to) or up_to)
    base = BaseModel(model, None, "toy", cpu=FAKE_CPUS[kind])
    sizes = (1, 2, 6, 64)
    if kind != "amx":
        assert [base.tree_row_limit(n) for n in sizes] == [None, 1, 1, 1] and not probed
        return
    assert [base.tree_row_limit(n) for n in sizes] == [None, None, None, None] and probed == [16, 64]
    monkeypatch.setattr(base_module, "row_invariant_rows", lambda model, up_to: 4)
    base = BaseModel(model, None, "toy", cpu=FAKE_CPUS[kind])
    assert [base.tree_row_limit(n) for n in sizes] == [None, None, 4, 4]
