"""`train --positions all` (the AR draft's default): every position of a sequence trains in one
teacher-forced pass. Its loss, gradients and metrics equal the sampled path's when that samples every
position (also when the heads are scored in checkpointed chunks), it learns, and it resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch

import ctc_drafter.training.evaluate as ev
import ctc_drafter.training.losses as losses
from ctc_drafter.draft import load_draft_folder, new_ar_draft_for
from ctc_drafter.training import evaluate_draft, load_sequences, split_eval
from ctc_drafter.training.data import HiddenReader, make_batch, most_frequent_targets
from ctc_drafter.training.evaluate import batch_losses
from conftest import interrupt_on_call
from test_train import (data_dir, load_weights, make_shards, one_thread, read_log, small_base,  # noqa: F401
                        small_model_dir, train_cli)


def _ar_draft(base, seqs, ctc_weight: float, vocab: int | None):
    loss = "ctc" if ctc_weight > 0 else "ce"
    weights = {"feature": 1.0, "token": 0.1, "ctc": ctc_weight}
    draft = new_ar_draft_for(base, seed=0, num_frames=4, label_len=3, loss=loss, draft_vocab=vocab or 0,
                             extra={"ar_loss_weights": weights}).float()
    if vocab:  # some windows then stop at a token outside the proposal vocabulary, some never start
        draft.set_vocab(most_frequent_targets(seqs, vocab))
    return draft


def _loss_and_grads(draft, hidden, batch):
    draft.zero_grad(set_to_none=True)
    lp, sums = batch_losses(draft, hidden, batch, draft.token_to_symbol(), draft.config.loss, draft.config)
    lp.total.backward()
    grads = {n: p.grad.clone() for n, p in draft.named_parameters() if p.grad is not None}
    return lp, sums, grads


@pytest.mark.parametrize("ctc_weight,vocab,chunk", [(0.01, None, None), (0.0, None, None), (0.5, 40, None),
                                                    (0.5, 40, 3), (0.0, None, 5)])
def test_every_position_equals_the_sampled_path_given_every_position(small_base, data_dir, monkeypatch,
                                                                     ctc_weight, vocab, chunk):
    seqs, _ = load_sequences([str(data_dir)], small_base, label_len=3, max_len=100)
    seqs = seqs[:3]  # lengths 24, 23, 22: padding in the batch, frames clamped past each end
    draft = _ar_draft(small_base, seqs, ctc_weight, vocab)
    reader = HiddenReader()
    dense = make_batch(seqs, [None] * 3, 3, reader)
    sampled = make_batch(seqs, [torch.nonzero(s.label_len > 0).flatten() for s in seqs], 3, reader)
    assert dense.positions is None and dense.label_len.shape == dense.input_ids.shape
    assert torch.equal(dense.input_ids, sampled.input_ids)
    hidden = small_base.forward(dense.input_ids, None, logits_at=slice(0, 0))[0]
    if chunk:  # several chunks: each checkpointed, its logits recomputed in backward
        per_position = (draft.config.num_tokens + 1) * (draft.config.num_frames if ctc_weight else 1)
        monkeypatch.setattr(losses, "LOGIT_CHUNK", chunk * per_position)
        assert losses.ARPositionTerms(dense.labels, dense.label_len, dense.label_len, draft.config).chunk == chunk
    a, sums_a, grads_a = _loss_and_grads(draft, hidden, dense)
    b, sums_b, grads_b = _loss_and_grads(draft, hidden, sampled)
    assert a.num_positions == b.num_positions > 0
    if vocab:
        assert a.num_positions < sum(s.num_positions for s in seqs)  # the vocabulary cut some windows
    assert set(a.parts) == set(b.parts) == ({"feature", "token", "loss"} | ({"ctc"} if ctc_weight else set()))
    for name in a.parts:
        assert a.parts[name] == pytest.approx(b.parts[name], rel=1e-5, abs=1e-6), name
    assert torch.equal(sums_a, sums_b)  # the greedy-decode metrics: same counts
    assert grads_a.keys() == grads_b.keys() and "fuse.weight" in grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6)


def test_ar_evaluation_in_one_pass_equals_the_sampled_chunks(small_base, data_dir, monkeypatch):
    seqs, _ = load_sequences([str(data_dir)], small_base, label_len=3, max_len=100)
    draft = _ar_draft(small_base, seqs, 0.01, None)
    one_pass = evaluate_draft(draft, small_base, seqs, "ctc").summary()
    monkeypatch.setattr(type(draft), "every_position", False)  # the earlier evaluation: 5 positions per pass
    chunks = evaluate_draft(draft, small_base, seqs, "ctc", positions=5).summary()
    assert one_pass.keys() == chunks.keys() and one_pass["positions"] == sum(s.num_positions for s in seqs)
    for name in ("loss", "feature", "token", "ctc"):
        assert one_pass[name] == pytest.approx(chunks[name], rel=1e-5), name
    assert [one_pass[k] for k in ("acc", "exact", "est_accept_len")] == [chunks[k] for k in ("acc", "exact",
                                                                                            "est_accept_len")]


def test_positions_all_trains_every_position_and_lowers_the_held_out_loss(small_model_dir, small_base, tmp_path):
    # stored hidden states (fp16), as `distill --save-hidden` writes them; the held-out pass runs under
    # the training precision's autocast (bf16 on CPUs with bf16 units)
    data_dir = make_shards(small_base, tmp_path / "data", hidden=True)
    out = tmp_path / "all"
    assert train_cli(small_model_dir, data_dir, out, "--arch", "ar", "--positions", "all", "--epochs", 4,
                     "--lr", 1e-2, "--eval-frac", 0.25) == 0
    seqs, _ = load_sequences([str(data_dir)], small_base, label_len=3, max_len=100)
    train_seqs, held_out = split_eval(seqs, 0.25, 0)
    trained = load_draft_folder(out).bind(small_base.model)
    untrained = new_ar_draft_for(small_base, seed=0, loss=trained.config.loss, extra=trained.config.extra)
    before = evaluate_draft(untrained, small_base, held_out, "ctc").summary()
    after = evaluate_draft(trained, small_base, held_out, "ctc").summary()
    assert after["loss"] < 0.95 * before["loss"], (before, after)  # held out: random prompts, a small margin
    epochs = [r for r in read_log(out) if r["event"] == "epoch"]
    assert epochs[-1]["eval"]["loss"] < epochs[0]["eval"]["loss"]
    # each epoch trained every trainable position of the training split once (6 sequences, bs 2: no wrap)
    assert all(e["train"]["positions"] == sum(s.num_positions for s in train_seqs) for e in epochs)
    steps = [r for r in read_log(out) if r["event"] == "step"]
    assert all(r["pos_per_s"] > 0 for r in steps)
    assert json.loads((out / "train_args.json").read_text())["positions"] == "all"


def test_positions_default_to_all_for_ar_and_a_count_for_nar(small_model_dir, data_dir, tmp_path, capsys):
    from ctc_drafter.cli.main import main as cli_main

    def train(out, *extra):
        return cli_main(["train", "--base-model", str(small_model_dir), "--data", str(data_dir), "--out", str(out),
                         "--device", "cpu", "--frames", "4", "--label-len", "3", "--bs", "4", "--epochs", "1",
                         "--eval-frac", "0", *extra])

    assert train(tmp_path / "ar", "--arch", "ar") == 0
    assert json.loads((tmp_path / "ar" / "train_args.json").read_text())["positions"] == "all"
    assert train(tmp_path / "nar") == 0
    assert json.loads((tmp_path / "nar" / "train_args.json").read_text())["positions"] == 32
    capsys.readouterr()
    assert train(tmp_path / "bad", "--positions", "all") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--positions all" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "bad" / "state_1").exists()


def test_recover_with_positions_all_equals_the_uninterrupted_run(small_model_dir, data_dir, tmp_path, monkeypatch):
    common = ("--arch", "ar", "--positions", "all", "--epochs", 2, "--lr", 1e-3, "--eval-frac", 0)
    straight = tmp_path / "straight"
    assert train_cli(small_model_dir, data_dir, straight, *common) == 0

    real, steps_per_epoch = ev.ar_dense_losses, 4  # 8 sequences, bs 2
    broken = tmp_path / "broken"
    interrupt_on_call(monkeypatch, ev, "ar_dense_losses", steps_per_epoch + 3)  # Ctrl-C after 2 steps of epoch 2
    assert train_cli(small_model_dir, data_dir, broken, *common) == 130
    monkeypatch.setattr(ev, "ar_dense_losses", real)
    assert (broken / "state_1").is_dir() and not (broken / "state_2").exists()
    assert train_cli(small_model_dir, data_dir, broken, *common, "--recover", 1) == 0
    a, b = load_weights(straight / "epoch_2"), load_weights(broken / "epoch_2")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    sl, bl = read_log(straight), read_log(broken)
    assert [round(r["loss"], 4) for r in sl if r["event"] == "step"] == \
        [round(r["loss"], 4) for r in bl if r["event"] == "step"]
