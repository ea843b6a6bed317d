"""The autoregressive CTC draft (draft/ar_model.py, decoding/proposers/ar.py): its levels equal a
from-scratch pass over its own top-1 path, decoding with it is lossless under every tree policy
(greedy and sampling), it saves and loads, and `ctc-drafter train --arch ar` fits it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import tiny_llama
from ctc_drafter.cli.main import main as cli_main
from ctc_drafter.decoding import CTCDrafter, DecodeState
from ctc_drafter.decoding.proposers import ARProposer, CTCProposer, make_proposer
from ctc_drafter.draft import (ARDraftModel, CTCDraftModel, DraftCache, DraftConfig, load_draft_folder,
                               new_ar_draft_for, new_draft_for)
from ctc_drafter.errors import CTCDrafterError
from ctc_drafter.models.base import BaseModel
from ctc_drafter.training import evaluate_draft, load_sequences
from ctc_drafter.training.losses import ar_losses
from test_exactness import hf_greedy
from test_train import (data_dir, one_thread, read_log, small_base, small_model_dir,  # noqa: F401 (fixtures)
                        tiny_data_dir, train_cli)


def _toy_ar(seed=1, draft_seed=0, **overrides):
    base = BaseModel(tiny_llama(seed=seed), None, "toy")
    return base, new_ar_draft_for(base, seed=draft_seed, **overrides)


# ---- the model -----------------------------------------------------------------------------------

def test_levels_equal_a_fresh_pass_over_the_top1_path_and_leave_the_cache_alone():
    """Level j from the cached, scratch-writing loop == the head of a non-cached teacher-forced pass over
    [accepted positions ; (f, top-1 token) of each earlier level]; the accepted cache is untouched."""
    base, draft = _toy_ar()
    g = torch.Generator().manual_seed(0)
    T, d = 7, draft.config.hidden_size
    hidden = torch.randn(1, T, d, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 64, (1, T), generator=g)
    cache = DraftCache()
    f_last = draft.extend(hidden, ids, cache)
    rows = draft.levels(f_last, cache, 4)[0]  # [4, N+1]
    assert rows.shape == (4, 65) and cache.length == T
    h_seq, id_seq = hidden, ids
    for j in range(4):
        out = draft(h_seq, id_seq, torch.tensor([[h_seq.shape[1] - 1]]))
        ref = torch.log_softmax(out.frames[0, 0, 0].float(), -1)
        torch.testing.assert_close(rows[j], ref, rtol=1e-5, atol=1e-5)
        top1 = int(rows[j, :64].argmax())  # the blank (index 64) is never fed back
        h_seq = torch.cat([h_seq, out.features[:, :1]], 1)
        id_seq = torch.cat([id_seq, torch.tensor([[top1]])], 1)
    # The scratch rows are overwritten by the next accepted positions: extending == extending afresh.
    more_h, more_ids = torch.randn(1, 2, d, generator=g, dtype=torch.float64), torch.tensor([[3, 9]])
    after = draft.extend(more_h, more_ids, cache)
    fresh = draft.extend(torch.cat([hidden, more_h], 1), torch.cat([ids, more_ids], 1), DraftCache())
    torch.testing.assert_close(after, fresh)


def test_levels_stop_below_the_path_cut_off_and_keep_the_rows_they_drafted():
    """With min_path_prob the loop drafts levels until the top-1 path's probability falls below it:
    the rows it returns are the first rows of the full run, and none is drafted past the cut."""
    base, draft = _toy_ar()
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 6, draft.config.hidden_size, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 64, (1, 6), generator=g)
    cache = DraftCache()
    f_last = draft.extend(hidden, ids, cache)
    full = draft.levels(f_last, cache, 4)[0]
    path = full[:, :64].max(-1).values.cumsum(0)  # log P(top-1 path) after each level
    for cut in (float(path[0]) + 1e-6, float(path[1]) + 1e-6, float(path[2]) - 1e-6, float("-inf")):
        rows = draft.levels(f_last, cache, 4, min_path_prob=math.exp(cut))[0]  # exp(-inf) = 0: every level
        m = next((j + 1 for j in range(3) if path[j] < cut), 4)  # levels drafted before the path fell below
        assert rows.shape[0] == m
        torch.testing.assert_close(rows, full[:m])


def test_ar_proposer_cut_off_is_settable_and_zero_drafts_every_level():
    base, draft = _toy_ar()
    p = ARProposer(draft, "prefix", min_path_prob=0.0)
    state = DecodeState([1, 2, 3], 4, torch.randn(1, 3, draft.config.hidden_size, dtype=torch.float64))
    p.start(state)
    rows = []
    real = draft.levels
    draft.levels = lambda *a: rows.append(real(*a)) or rows[-1]
    p.propose(state, 8, 64)
    assert rows[-1].shape[1] == 4  # 0: every level
    p.min_path_prob = 1.0  # any path is below certainty: only level 0
    p.propose(state, 8, 64)
    assert rows[-1].shape[1] == 1 and p.describe()["min_path_prob"] == 1.0


def test_ar_draft_has_no_frame_parameters_and_validates_its_architecture():
    _, draft = _toy_ar()
    names = {n for n, _ in draft.named_parameters()}
    assert not any(n.startswith("frame_") for n in names) and "fuse.weight" in names
    assert draft.config.architecture == "ar" and draft.config.num_frames == 4 and draft.config.label_len == 3
    with pytest.raises(CTCDrafterError, match="architecture"):
        DraftConfig(32, 64, 4, 2, 8, 64, architecture="rnn").validate()


def test_save_load_round_trip_and_old_configs_load_as_nar(tmp_path):
    base, draft = _toy_ar(draft_seed=3)
    draft.save_pretrained(tmp_path / "ar")
    loaded = load_draft_folder(tmp_path / "ar", dtype=torch.float64).bind(base.model)
    assert isinstance(loaded, ARDraftModel) and loaded.config == draft.config and loaded.fingerprint
    h, ids = torch.randn(1, 5, 32, dtype=torch.float64), torch.tensor([[1, 2, 3, 4, 5]])
    a, b = DraftCache(), DraftCache()
    torch.testing.assert_close(draft.levels(draft.extend(h, ids, a), a), loaded.levels(loaded.extend(h, ids, b), b))
    # a config.json written before the field existed
    new_draft_for(base).save_pretrained(tmp_path / "nar")
    cfg = json.loads((tmp_path / "nar" / "config.json").read_text())
    del cfg["architecture"]
    (tmp_path / "nar" / "config.json").write_text(json.dumps(cfg))
    assert type(load_draft_folder(tmp_path / "nar")) is CTCDraftModel


def test_untrained_ar_loads_by_name_for_any_base():
    from ctc_drafter.draft import load_draft

    base = BaseModel(tiny_llama(seed=1), None, "toy")
    draft, trained = load_draft("untrained-ar", base, quiet=True)
    assert isinstance(draft, ARDraftModel) and not trained


def test_make_proposer_picks_the_architectures_proposer():
    base, ar = _toy_ar()
    assert type(make_proposer("ctc", ar, "medusa")) is ARProposer
    assert type(make_proposer("ctc", new_draft_for(base), "medusa")) is CTCProposer
    hybrid = make_proposer("hybrid", ar, "prefix")
    assert any(isinstance(p, ARProposer) for p in hybrid.parts)
    assert make_proposer("ctc", ar, "beam").describe() == {"proposer": "ctc", "generator": "beam",
                                                           "ctc_transform": True, "architecture": "ar", "levels": 4,
                                                           "min_path_prob": 0.1}


# ---- lossless decoding -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("generator,budget", [("medusa", 64), ("medusa", 20), ("prefix", 6), ("prefix", 24),
                                              ("beam", 12)])
def test_ar_speculative_equals_vanilla_equals_hf(dtype, generator, budget, first_arm):
    base = BaseModel(tiny_llama(dtype=dtype, seed=1), None, "toy")
    g = torch.Generator().manual_seed(budget)
    longest = 1
    for trial in range(3):
        drafter = CTCDrafter(base, new_ar_draft_for(base, seed=trial), generator=generator, budget=budget,
                             proposer="ctc", switch=first_arm)
        drafter.proposer.min_path_prob = (0.0, 0.1, 0.5)[trial]  # every level / the default cut / an earlier one
        ids = torch.randint(0, 64, (1, int(torch.randint(1, 12, (), generator=g))), generator=g)
        spec = drafter.generate(ids, max_new_tokens=30)
        van = drafter.generate(ids, max_new_tokens=30, speculative=False)
        assert spec.tokens == van.tokens == hf_greedy(base.model, ids, 30)
        assert sum(spec.accept_lengths) == 30 and max(spec.tree_sizes) <= budget
        longest = max(longest, max(spec.accept_lengths))
    assert longest > 1, "no step accepted a draft token: the multi-token path is untested"


def test_hybrid_with_the_ar_draft_is_lossless(first_arm):
    base = BaseModel(tiny_llama(seed=1), None, "toy")
    ids = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6]])  # repetitive: the n-gram part has matches too
    drafter = CTCDrafter(base, new_ar_draft_for(base), generator="prefix", budget=12, proposer="hybrid",
                         switch=first_arm)
    assert drafter.generate(ids, max_new_tokens=30).tokens == hf_greedy(base.model, ids, 30)


def test_ar_without_blank_and_with_a_proposal_vocabulary_is_lossless(first_arm):
    """EAGLE-style (loss ce: no blank) and a shortlist whose symbols are not token ids."""
    base = BaseModel(tiny_llama(seed=2), None, "toy")
    ids = torch.tensor([[4, 8, 15, 16, 23]])
    ref = hf_greedy(base.model, ids, 25)
    for over in ({"loss": "ce"}, {"draft_vocab": 40}):
        draft = new_ar_draft_for(base, seed=0, **over)
        if "draft_vocab" in over:
            draft.set_vocab(torch.randperm(64, generator=torch.Generator().manual_seed(0))[:40])
        for generator in ("medusa", "prefix"):
            drafter = CTCDrafter(base, draft, generator=generator, budget=16, proposer="ctc", switch=first_arm)
            assert drafter.generate(ids, 25).tokens == ref


def test_ar_speculative_sampling_matches_base_distribution(first_arm):
    """tests/test_sampling.py's chi-square check with the AR draft proposing (one setting: 2500 runs)."""
    import test_sampling as ts

    model = tiny_llama(vocab_size=ts.V, seed=11)
    with torch.no_grad():
        model.lm_head.weight.mul_(4)
        exact = ts.exact_joint(model, 0.7, 5, 0.9)
    base = BaseModel(model, None, "toy")
    drafter = CTCDrafter(base, new_ar_draft_for(base, seed=0), generator="medusa", budget=64, proposer="ctc",
                         switch=first_arm)
    counts, multi = {}, 0
    for i in range(ts.N):
        r = drafter.generate(ts.PROMPT, max_new_tokens=3, temperature=0.7, top_k=5, top_p=0.9, seed=i)
        counts[tuple(r.tokens)] = counts.get(tuple(r.tokens), 0) + 1
        multi += r.steps < 3
    assert multi > ts.N // 4, f"draft tokens were rarely accepted ({multi}/{ts.N})"
    stat, dof = ts.chi2_stat(counts, exact, ts.N)
    assert stat < ts.chi2_critical(dof), f"chi2 {stat:.1f} over {dof} dof"


# ---- training ----------------------------------------------------------------------------------

def test_ar_loss_is_the_weighted_sum_of_its_parts():
    base, draft = _toy_ar()
    draft.config.extra = {"ar_loss_weights": {"feature": 2.0, "token": 0.5, "ctc": 0.25}}
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 10, 32, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 64, (2, 10), generator=g)
    pos = torch.tensor([[0, 3, 5], [1, 2, 6]])
    labels = torch.randint(0, 64, (2, 3, 3), generator=g)
    lens = torch.tensor([[3, 3, 2], [3, 0, 1]])
    out = draft(hidden, ids, pos)
    lp = ar_losses(out, hidden, pos, labels, lens, draft.config)
    p = lp.parts
    assert lp.num_positions == 5 and set(p) == {"feature", "token", "ctc", "loss"}
    assert p["loss"] == pytest.approx(2.0 * p["feature"] + 0.5 * p["token"] + 0.25 * p["ctc"])
    # the feature term is zero exactly when f_t equals the base's next hidden state
    target = torch.gather(hidden, 1, (pos + 1)[..., None].expand(2, 3, 32))
    exact = ar_losses(out._replace(features=target), hidden, pos, labels, lens, draft.config)
    assert exact.parts["feature"] == 0.0
    draft.config.loss = "ce"  # EAGLE-style: no CTC term at all
    assert "ctc" not in ar_losses(out, hidden, pos, labels, lens, draft.config).parts


@pytest.mark.parametrize("ctc_weight", ["0.01", "0"])
def test_train_arch_ar_lowers_the_loss(small_model_dir, small_base, data_dir, tmp_path, ctc_weight):
    out = tmp_path / "ar"
    assert train_cli(small_model_dir, data_dir, out, "--arch", "ar", "--ctc-weight", ctc_weight, "--epochs", 4,
                     "--lr", 1e-2, "--eval-frac", 0.25) == 0
    trained = load_draft_folder(out).bind(small_base.model)
    assert isinstance(trained, ARDraftModel) and trained.config.num_frames == 4
    assert trained.config.loss == ("ce" if ctc_weight == "0" else "ctc")
    assert trained.config.extra["ar_loss_weights"]["ctc"] == float(ctc_weight)
    seqs, _ = load_sequences([str(data_dir)], small_base, label_len=3, max_len=100)
    untrained = new_ar_draft_for(small_base, seed=0, loss=trained.config.loss, extra=trained.config.extra)
    before = evaluate_draft(untrained, small_base, seqs, trained.config.loss).summary()
    after = evaluate_draft(trained, small_base, seqs, trained.config.loss).summary()
    assert after["loss"] < 0.8 * before["loss"], (before, after)
    steps = [r for r in read_log(out) if r["event"] == "step"]
    assert steps[-1]["loss"] < steps[0]["loss"] and "feature" in steps[-1] and "token" in steps[-1]


def test_trained_ar_draft_loads_in_generate(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "gen"
    assert train_cli(tiny_model_dir, tiny_data_dir, out, "--arch", "ar", "--epochs", 1) == 0
    capsys.readouterr()
    assert cli_main(["generate", "--base-model", str(tiny_model_dir), "--draft-model", str(out), "--prompt", "hi",
                     "--max-new-tokens", "5", "--json", "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["new_tokens"] == 5 and res["draft_trained"] is True
    drafter = CTCDrafter.from_pretrained(str(tiny_model_dir), str(out), device="cpu", generator="medusa")
    assert any(isinstance(p, ARProposer) for p in drafter.proposer.parts)  # the default hybrid drafts with it
    ids = drafter.base.tokenizer("hello there", return_tensors="pt").input_ids
    assert drafter.generate(ids, max_new_tokens=8).tokens == drafter.generate(ids, 8, speculative=False).tokens
