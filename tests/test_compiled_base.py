"""The compiled static backends (models/compiled_base.py): lossless with respect to the engine's own greedy for
every proposer and tree policy, a tree row bit for bit the 1-token step's, and their errors.

The static layers run eagerly here (the same int4/int8 kernels and row attention, no compile time); the
compiled graphs are checked on the real model in the slow tier."""

import pytest
import torch

from conftest import tiny_llama
from ctc_drafter.decoding import CTCDrafter
from ctc_drafter.decoding.tree import TokenTree
from ctc_drafter.draft import new_draft_for
from ctc_drafter.errors import CTCDrafterError
from ctc_drafter.models.base import BaseModel
from ctc_drafter.models.compiled_base import bucket, compile_base, row_layout
from ctc_drafter.models.kv_cache import compact_kv, new_kv_cache

CASES = [("ctc", "beam", 12), ("ctc", "medusa", 64), ("ctc", "prefix", 4), ("ctc", "prefix", 24),
         ("ngram", None, 16), ("hybrid", "prefix", 16)]


def engine(backend: str, dtype=torch.float32, seed: int = 1, context: int = 256):
    hf = tiny_llama(dtype=torch.float64 if dtype == torch.float64 else torch.float32, seed=seed)
    return compile_base(BaseModel(hf, None, "toy"), backend, context=context, eager=True, dtype=dtype)


def prompts(seed: int, repeat: bool):
    """Random prompts; repeated ones give n-gram lookup matches to propose."""
    g = torch.Generator().manual_seed(seed)
    for k in range(4):
        ids = torch.randint(0, 64, (1, 4 + 3 * k), generator=g)
        yield torch.cat([ids, ids, ids], 1) if repeat else ids


@pytest.mark.parametrize("backend", ["compiled-int4", "compiled-int8"])
@pytest.mark.parametrize("proposer,policy,budget", CASES)
def test_speculative_equals_the_engines_own_greedy(backend, proposer, policy, budget, first_arm):
    base = engine(backend)
    longest = 1
    for trial, ids in enumerate(prompts(budget, repeat=proposer != "ctc")):
        draft = new_draft_for(base, seed=trial) if proposer != "ngram" else None
        d = CTCDrafter(base, draft, generator=policy, budget=budget, proposer=proposer, switch=first_arm)
        spec = d.generate(ids, max_new_tokens=40)
        own = d.generate(ids, max_new_tokens=40, speculative=False)
        assert spec.tokens == own.tokens and len(own.tokens) == 40
        assert max(spec.tree_sizes) > 1, "no tree was verified: the tree path is untested"
        longest = max(longest, max(spec.accept_lengths))
    assert longest > 1, "no step accepted a proposed token: compaction is untested"


@pytest.mark.parametrize("proposer,policy,budget", CASES[:3])
def test_bf16_layout_in_float64_is_the_hf_models_greedy(proposer, policy, budget, first_arm):
    """Without quantisation and in float64 the static engine computes the HF model's greedy itself: the
    row layout, positions, compaction and cache bookkeeping are right, not only self-consistent."""
    base = engine("compiled-bf16", dtype=torch.float64)
    d = CTCDrafter(base, new_draft_for(base, seed=0), generator=policy, budget=budget, proposer=proposer,
                   switch=first_arm)
    for ids in prompts(7, repeat=False):
        hf = base.model.generate(ids, max_new_tokens=30, do_sample=False, attention_mask=torch.ones_like(ids))
        assert d.generate(ids, max_new_tokens=30).tokens == hf[0, ids.shape[1]:].tolist()


def test_a_long_prompt_is_prefilled_densely_and_stays_lossless(first_arm):
    """A prompt longer than DENSE_ROWS is prefilled through dense products of the dequantized weights and
    causal attention over its own rows only: speculation and the engine's own greedy share that prefill and
    stay equal; in float64 without quantisation the long prefill is still the HF model's greedy."""
    from ctc_drafter.models.static_llama import DENSE_ROWS

    ids = torch.randint(0, 64, (1, DENSE_ROWS + 37), generator=torch.Generator().manual_seed(3))
    ids = torch.cat([ids, ids[:, :20]], 1)  # a repeat for n-gram lookup to find
    base = engine("compiled-int4")
    d = CTCDrafter(base, new_draft_for(base, seed=0), generator="prefix", budget=8, proposer="hybrid",
                   switch=first_arm)
    spec = d.generate(ids, max_new_tokens=30)
    assert spec.tokens == d.generate(ids, max_new_tokens=30, speculative=False).tokens
    assert max(spec.tree_sizes) > 1
    exact = engine("compiled-bf16", dtype=torch.float64)
    hf = exact.model.generate(ids, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(ids))
    own = CTCDrafter(exact, None, proposer="ngram", budget=4, switch=first_arm).generate(ids, max_new_tokens=20)
    assert own.tokens == hf[0, ids.shape[1]:].tolist()


def test_a_tree_row_is_the_one_token_steps_row_bit_for_bit():
    """Each node of a branching tree pass gets exactly the logits and hidden state that 1-token steps along
    its path get (int4, bf16 activations: where CPU flash attention would round rows apart)."""
    base = engine("compiled-int4", dtype=torch.bfloat16)
    prompt = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(0))
    tree = TokenTree([5, 7, 9, 11, 13, 2], [-1, 0, 0, 1, 2, 3])  # two branches under the root, depth 3
    cache = new_kv_cache(base)
    base.forward(prompt, cache, logits_at=slice(-1, None))
    past = cache.get_seq_length()
    ids, pos, mask = tree.verify_inputs(past, base.device, base.dtype)
    hidden, logits = base.forward(ids, cache, position_ids=pos, attention_mask=mask)
    for node in range(len(tree)):
        path = tree.path_to(node)
        steps = new_kv_cache(base)
        base.forward(prompt, steps, logits_at=slice(-1, None))
        for i in path:
            h1, l1 = base.forward(torch.tensor([[tree.tokens[i]]]), steps)
        assert torch.equal(l1[0, -1], logits[0, node]) and torch.equal(h1[0, -1], hidden[0, node])


def test_compaction_keeps_the_accepted_path_in_order():
    base = engine("compiled-int4", dtype=torch.bfloat16)
    prompt = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(3))
    tree = TokenTree([4, 8, 15, 16, 23], [-1, 0, 0, 2, 3])
    cache = new_kv_cache(base)
    base.forward(prompt, cache, logits_at=slice(-1, None))
    ids, pos, mask = tree.verify_inputs(6, base.device, base.dtype)
    base.forward(ids, cache, position_ids=pos, attention_mask=mask)
    compact_kv(cache, 6, [0, 2, 3])
    assert cache.get_seq_length() == 9
    _, after_tree = base.forward(torch.tensor([[42]]), cache)
    plain = new_kv_cache(base)
    base.forward(torch.cat([prompt, torch.tensor([[4, 15, 16]])], 1), plain, logits_at=slice(-1, None))
    _, straight = base.forward(torch.tensor([[42]]), plain)
    # the straight cache's rows 6-8 came from a prefill (other rows per call), so compare to rounding
    torch.testing.assert_close(after_tree, straight, rtol=0.05, atol=0.05)


def test_row_layout_reads_each_nodes_ancestors_in_position_order():
    seen = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    perm, valid = row_layout(seen, past=3, rows=8, length=16)
    assert perm.shape == valid.shape == (8, 16)
    assert valid[:, :3].all() and not valid[:, 7:].any()
    assert perm[3, 3:6].tolist() == [3, 5, 6] and valid[3, 3:7].tolist() == [True, True, True, False]
    assert perm[1, 3:5].tolist() == [3, 4] and valid[1].sum() == 5
    assert valid[4:].sum(1).tolist() == [3, 3, 3, 3]  # padding rows see the past only
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 16, 17)] == [1, 2, 4, 4, 8, 16, 32]


def test_context_limit_stops_like_the_engines_own_loop(first_arm):
    base = engine("compiled-int4", context=80)
    assert base.max_length == 80
    d = CTCDrafter(base, new_draft_for(base, seed=0), generator="prefix", budget=8, proposer="ctc", switch=first_arm)
    ids = torch.randint(0, 64, (1, 70), generator=torch.Generator().manual_seed(2))
    spec, own = d.generate(ids, max_new_tokens=50), d.generate(ids, max_new_tokens=50, speculative=False)
    assert spec.tokens == own.tokens and len(spec.tokens) == 10 and spec.stop_reason == own.stop_reason == "context"
    with pytest.raises(CTCDrafterError, match="context"):
        d.generate(torch.zeros(1, 80, dtype=torch.long), max_new_tokens=5)


def test_errors_are_one_clear_line():
    base = engine("compiled-int4")
    old = new_kv_cache(base)
    base.forward(torch.tensor([[1, 2, 3]]), old)
    new_kv_cache(base)  # a new request on the same engine
    with pytest.raises(CTCDrafterError, match="one request at a time"):
        base.forward(torch.tensor([[4]]), old)
    with pytest.raises(CTCDrafterError, match="unknown backend"):
        compile_base(BaseModel(tiny_llama(), None, "toy"), "compiled-int3")
    with pytest.raises(CTCDrafterError, match="context above"):
        compile_base(BaseModel(tiny_llama(), None, "toy"), "compiled-int8", context=16)
    base.hidden_layers = [0, 1]
    with pytest.raises(CTCDrafterError, match="eagle3"):
        base.forward(torch.tensor([[1]]), new_kv_cache(base))


def test_cli_refuses_a_backend_for_other_engines(capsys):
    from ctc_drafter.cli.main import main

    code = main(["eval", "--bench", "mt_bench", "--question-file", "tests/data/mt_bench_question.jsonl",
                 "--engine", "hf", "--backend", "compiled-int4", "--model-id", "m", "--answer-file",
                 "never-written.jsonl"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and "--backend compiled-int4" in err[0] and "Traceback" not in err[0]


def test_demo_judges_a_compiled_backend_against_its_own_greedy():
    from types import SimpleNamespace as R

    from ctc_drafter.cli.demo import _differences

    runs = {"spec": R(tokens=[1, 2, 3]), "base": R(tokens=[1, 2, 3]), "hf": R(tokens=[1, 2, 4])}
    assert _differences(runs, own=True) == "yes; HF generate's fp32 answer differs from new token 2 on"
    assert _differences(runs).startswith("NO (speculative differs from HF generate at new token 2")
    runs["spec"] = R(tokens=[1, 5, 3])
    assert _differences(runs, own=True).startswith("NO (speculative differs from the engine's own greedy at new token 1)")


def test_backend_rows_script_finds_row_attention_exact(tiny_model_dir, capsys):
    from conftest import load_script

    load_script("backend_rows").main(["--base-model", str(tiny_model_dir), "--past", "40", "--sizes", "4,8",
                                      "--eager"])
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("rows")]
    assert len(rows) == 3 and all(ln.endswith("row 0 0, row 1 0") for ln in rows), rows


@pytest.mark.slow
def test_compiled_int4_on_the_embedded_model_is_its_own_greedy():
    """The real graphs (torch.compile, each pass size) on SmolLM2: the defaults' answers equal the engine's own."""
    from ctc_drafter.decoding import SpeculativeDecoder

    d = SpeculativeDecoder.from_pretrained("default", "default", device="cpu", dtype="float32",
                                           backend="compiled-int4", cpu_threads=1)
    assert d.kernels == "compiled-int4"
    for prompt in ("Write a short poem about autumn leaves.", "What is 17 * 23? Explain step by step."):
        spec = d.chat(prompt, max_new_tokens=64)
        own = d.chat(prompt, max_new_tokens=64, speculative=False)
        assert spec.tokens == own.tokens and spec.mean_accept_length > 1


def test_warm_refuses_an_engine_whose_tree_rows_round_apart(monkeypatch):
    """The load-time check (check_rows): a pass whose rows differ from 1-token steps, by however little, is
    refused with one clear line instead of decoding non-losslessly."""
    base = engine("compiled-int4")
    assert base.warm(16) >= 0  # the real engine passes on this CPU
    pass_ = base._pass

    def drifting(ids, past, position_ids, attention_mask):
        hidden, logits = pass_(ids, past, position_ids, attention_mask)
        return hidden, logits + (1e-3 if ids.shape[1] > 2 else 0.0)  # passes of 3+ rows round apart

    monkeypatch.setattr(base, "_pass", drifting)
    assert base.warm(2) >= 0  # 2-row passes are still exact
    with pytest.raises(CTCDrafterError, match="4-token pass rounds row 0 apart"):
        base.warm(4)
