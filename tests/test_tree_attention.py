"""models/tree_attention.py: in a tree pass every node's attention is the very call a 1-token step makes
(one query row, no mask, exactly the keys it may see), so bf16 trees round like vanilla decoding."""

import types

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ctc_drafter.models.tree_attention import exact_tree_pass, exact_tree_sdpa, register

register()  # binds transformers' SDPA function, as loading a bf16 CPU base does

GQA = types.SimpleNamespace(num_key_value_groups=3, is_causal=True)  # SmolLM2's 9 query / 3 KV heads


def vanilla_call(q_row, keys, values):
    """What a 1-token decoding step computes: one query row over the cache, no mask."""
    out, _ = sdpa_attention_forward(GQA, q_row, keys, values, None, scaling=0.125)
    return out  # [1,1,H,d]


def test_a_one_node_tree_is_the_unmasked_vanilla_call():
    """A masked 1-row call packs the GQA heads differently and rounds differently (13 of 200 random cases
    here); inside a tree pass the row must still be the vanilla call, bit for bit."""
    g = torch.Generator().manual_seed(0)
    masked_differs = 0
    for _ in range(200):
        n_keys = int(torch.randint(2, 400, (), generator=g))
        q = torch.randn(1, 9, 1, 64, generator=g).bfloat16()
        k, v = (torch.randn(1, 3, n_keys, 64, generator=g).bfloat16() for _ in range(2))
        zero = torch.zeros(1, 1, 1, n_keys, dtype=torch.bfloat16)
        ref = vanilla_call(q, k, v)
        with exact_tree_pass():
            got, _ = exact_tree_sdpa(GQA, q, k, v, zero, scaling=0.125)
        assert torch.equal(got, ref)
        masked, _ = sdpa_attention_forward(GQA, q, k, v, zero, scaling=0.125)
        masked_differs += not torch.equal(masked, ref)
    assert masked_differs > 0, "the masked call no longer rounds differently here: the test lost its witness"


def test_every_node_of_a_tree_attends_as_a_vanilla_step_over_its_path():
    g = torch.Generator().manual_seed(1)
    past, parents = 37, [-1, 0, 0, 1, 1, 2, 3, 3, 5, 8]  # branching, chains and equal depths
    n = len(parents)
    q = torch.randn(1, 9, n, 64, generator=g).bfloat16()
    k, v = (torch.randn(1, 3, past + n, 64, generator=g).bfloat16() for _ in range(2))
    visible = torch.zeros(n, past + n, dtype=torch.bool)
    visible[:, :past] = True
    for i in range(n):
        j = i
        while j != -1:
            visible[i, past + j] = True
            j = parents[j]
    mask = torch.zeros(n, past + n, dtype=torch.bfloat16).masked_fill(~visible, torch.finfo(torch.bfloat16).min)
    with exact_tree_pass():
        out, _ = exact_tree_sdpa(GQA, q, k, v, mask[None, None], scaling=0.125)
    for i in range(n):
        idx = visible[i].nonzero()[:, 0]
        ref = vanilla_call(q[:, :, i:i + 1], k[:, :, idx], v[:, :, idx])
        assert torch.equal(out[:, i:i + 1], ref), f"node {i}"


def test_outside_a_tree_pass_it_is_plain_sdpa():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 9, 5, 64, generator=g).bfloat16()
    k, v = (torch.randn(1, 3, 5, 64, generator=g).bfloat16() for _ in range(2))
    ref, _ = sdpa_attention_forward(GQA, q, k, v, None, scaling=0.125)  # a prefill: causal, no mask
    got, _ = exact_tree_sdpa(GQA, q, k, v, None, scaling=0.125)
    assert torch.equal(got, ref)
