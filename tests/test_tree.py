"""Token trees, CTC-transformed Medusa trees, and KV-cache compaction."""

import pytest
import torch

from ctc_drafter.decoding.proposers import MEDUSA_63, BeamTree, MedusaTree
from ctc_drafter.decoding.tree import TokenTree
from ctc_drafter.models.kv_cache import compact_kv
from ctc_drafter.draft.ctc import collapse


def test_medusa_choices_are_63_prefix_closed_paths():
    assert len(MEDUSA_63) == 63
    s = {tuple(c) for c in MEDUSA_63}
    assert len(s) == 63
    assert all(tuple(c[:-1]) in s for c in MEDUSA_63 if len(c) > 1)


def test_trie_merges_duplicate_prefixes_and_respects_budget():
    tree = TokenTree.from_sequences(5, [([1, 2, 3], -0.1), ([1, 2, 4], -1.0), ([7], -2.0), ([1, 2, 3], -3.0)], budget=100)
    # Nodes: root, 1, 1-2, 1-2-3, 1-2-4, 7 (the duplicate [1,2,3] adds no node)
    assert len(tree) == 6
    assert tree.tokens[0] == 5 and tree.parents[0] == -1
    paths = {tuple(tree.tokens[i] for i in tree.path_to(n)[1:]) for n in range(len(tree))}
    assert paths == {(), (1,), (1, 2), (1, 2, 3), (1, 2, 4), (7,)}
    small = TokenTree.from_sequences(5, [([1, 2, 3], -0.1), ([1, 2, 4], -1.0), ([7], -2.0)], budget=3)
    assert len(small) == 3 and small.tokens == [5, 1, 2]  # best prefix chain kept, prefix-closed
    for i in range(1, len(small)):
        assert small.parents[i] < i


def test_verify_inputs_mask_and_positions():
    tree = TokenTree([9, 1, 2, 3], [-1, 0, 0, 1])
    ids, pos, mask = tree.verify_inputs(past_len=4, device="cpu", dtype=torch.float32)
    assert ids.tolist() == [[9, 1, 2, 3]]
    assert pos.tolist() == [[4, 5, 5, 6]]
    allowed = (mask[0, 0] == 0)
    assert allowed[:, :4].all()  # the whole past is visible
    assert allowed[:, 4:].tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]


def test_medusa_tree_is_ctc_transformed():
    # Frame 0 prefers token 3, frame 1 prefers blank, frame 2 prefers 3 again: the top path
    # "3 _ 3" collapses to [3, 3]; "3 3 ..." collapses repeats. Every node must be a collapsed path.
    V = 6  # symbols 0..5, blank = 5
    lp = torch.full((4, V), -8.0)
    lp[0, 3], lp[1, 5], lp[2, 3], lp[3, 3] = -0.1, -0.1, -0.1, -0.1
    lp[0, 2], lp[1, 3], lp[2, 5] = -1.0, -1.0, -1.0
    lp = torch.log_softmax(lp, -1)
    gen = MedusaTree()
    tree = gen.build(0, lp, max_depth=10, budget=64)
    seqs = {tuple(tree.tokens[i] for i in tree.path_to(n)[1:]) for n in range(len(tree))}
    topk = lp.topk(V, -1).indices
    expected = set()
    for path in (p for p in MEDUSA_63 if max(p) < V):  # ranks beyond the symbol count do not exist
        c = tuple(collapse([topk[f][r].item() for f, r in enumerate(path)], V - 1))
        expected.update(c[:d] for d in range(len(c) + 1))
    assert seqs == expected
    assert (3, 3) in seqs and len(tree) < 64  # duplicates merged, so fewer nodes than paths


def test_beam_tree_budget_and_depth():
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(8, 11, generator=g), -1)
    tree = BeamTree().build(0, lp, max_depth=3, budget=10)
    assert len(tree) <= 10 and max(tree.depths) <= 3


def test_compact_kv_keeps_past_and_accepted_path_in_place():
    from transformers import DynamicCache

    cache = DynamicCache()
    k = torch.arange(2 * 1 * 7 * 1, dtype=torch.float32).view(1, 2, 7, 1)
    cache.update(k.clone(), -k.clone(), 0)
    storage = cache.layers[0].keys.data_ptr()
    compact_kv(cache, past_len=3, keep=[0, 2, 3])
    kk = cache.layers[0].keys
    assert kk.shape[2] == 6
    assert kk[0, 0, :, 0].tolist() == [0, 1, 2, 3, 5, 6]
    assert torch.equal(cache.layers[0].values, -kk)
    assert cache.get_seq_length() == 6
    assert kk.data_ptr() == storage  # rows moved within the layer's tensor, the past not copied
    compact_kv(cache, past_len=4, keep=[0, 1])  # a path already in place: only the length changes
    assert cache.layers[0].keys[0, 0, :, 0].tolist() == [0, 1, 2, 3, 5, 6]



def test_growing_cache_writes_each_pass_in_place_and_survives_compaction():
    """new_kv_cache's layers append without copying the past (DynamicLayer's torch.cat copies it every pass)."""
    from transformers import DynamicCache

    from ctc_drafter.models.kv_cache import new_kv_cache

    base = type("B", (), {"attention_layout": None})()
    grow, plain = new_kv_cache(base), DynamicCache()
    g = torch.Generator().manual_seed(0)
    rows = lambda n: torch.randn(1, 2, n, 3, generator=g)  # noqa: E731
    steps = [(rows(5), None), (rows(4), [0, 2]), (rows(3), [0]), (rows(6), [0, 1, 2, 3, 4, 5]), (rows(2), [0, 1])]
    ptrs = []
    for k, keep in steps:
        for c in (grow, plain):
            past = c.get_seq_length()
            c.update(k, -k, 0)
            if keep is not None:
                compact_kv(c, past_len=past, keep=keep)
        assert torch.equal(grow.layers[0].keys, plain.layers[0].keys)
        assert torch.equal(grow.layers[0].values, -grow.layers[0].keys)
        ptrs.append(grow.layers[0].keys.data_ptr())
    assert len(set(ptrs)) == 1  # one storage throughout (64 rows hold these 14): nothing re-copied
    # a layer whose keys were replaced from outside (a crop, a reorder) is refilled, not corrupted
    layer = grow.layers[0]
    layer.keys, layer.values = layer.keys[:, :, :3].clone(), layer.values[:, :, :3].clone()
    plain.layers[0].keys, plain.layers[0].values = plain.layers[0].keys[:, :, :3], plain.layers[0].values[:, :, :3]
    k = rows(2)
    for c in (grow, plain):
        c.update(k, -k, 0)
    assert torch.equal(grow.layers[0].keys, plain.layers[0].keys) and grow.get_seq_length() == 5

def test_compact_kv_refuses_layers_with_their_own_bookkeeping():
    """A sliding-window layer counts positions itself and drops old rows: compacting it would corrupt it."""
    from transformers import DynamicCache, MistralConfig

    from ctc_drafter.errors import CTCDrafterError

    cache = DynamicCache(config=MistralConfig(num_hidden_layers=1, sliding_window=4))
    cache.update(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2), 0)
    with pytest.raises(CTCDrafterError, match="DynamicSlidingWindowLayer"):
        compact_kv(cache, past_len=1, keep=[0])
