"""`ctc-drafter train`: data plan, losses, learning, resume, DDP launch, loading the result, bad input.

Everything runs on CPU with tiny random bases (SmolLM2's tokenizer): `tiny_model_dir` (vocab 49152)
where the result must load in `generate`, a vocab-256 one where it must learn; shards are made here
from random token sequences whose targets are the base's own argmax.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import interrupt_on_call
from ctc_drafter.cli.main import main as cli_main
from ctc_drafter.data.shards import Sequence, write_manifest, write_shard
from ctc_drafter.errors import CTCDrafterError
from ctc_drafter.models.base import load_base_model
from ctc_drafter.testing import FAKE_CPUS
from ctc_drafter.training import (compute_losses, ctc_loss, evaluate_draft, label_window_lengths, load_sequences,
                                  make_batch, sample_positions)
from ctc_drafter.training.metrics import DraftMetrics

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: with the cores shared, a second intra-op thread only adds scheduling stalls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_shards(base, out: Path, n_seqs: int = 8, length: int = 24, per_shard: int = 4, hidden: bool = False,
                seed: int = 0, vocab_limit: int = 200, mask_from: float = 0.5) -> Path:
    """A distilled data folder from `base`: random prompts, targets = the base's argmax, loss_mask on the tail."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(n_seqs):
        T = length - (i % 3)  # a few different lengths, so batches need padding
        ids = torch.randint(0, vocab_limit, (T,), generator=g)
        h, logits = base.forward(ids[None].to(base.device), None)
        mask = torch.zeros(T, dtype=torch.bool)
        mask[int(T * mask_from): T - 1] = True  # t trains when token t+1 is "assistant"; the last has no next
        seqs.append(Sequence(ids, logits[0].argmax(-1).cpu(), mask, h[0].cpu().half() if hidden else None))
    out.mkdir(parents=True, exist_ok=True)
    for s in range(0, n_seqs, per_shard):
        write_shard(out / f"shard_{s // per_shard:05d}.safetensors", seqs[s: s + per_shard])
    write_manifest(out, {"format": 1, "base": base.signature(), "template": "auto", "mode": "test",
                         "total": {"sequences": n_seqs}})
    return out


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory, smol_tokenizer):
    """A smaller base for learning tests: vocab 256 and a less flat random LM head than `tiny_model_dir`
    (whose 49152-way head with 0.02-scale weights makes every distribution near-uniform and slow to fit)."""
    return _save_llama(tmp_path_factory.mktemp("small-base"), smol_tokenizer, vocab=256, hidden=32, init=0.2)


def _save_llama(d: Path, tok, vocab: int, hidden: int, init: float = 0.02, layers: int = 2, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      initializer_range=init, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def small_base(small_model_dir):
    return load_base_model(str(small_model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def data_dir(small_base, tmp_path_factory):
    return make_shards(small_base, tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def tiny_data_dir(tiny_model_dir, tmp_path_factory):
    return make_shards(load_base_model(str(tiny_model_dir), device="cpu"), tmp_path_factory.mktemp("tiny-data"),
                       n_seqs=4)


def train_cli(base_dir, data, out, *extra) -> int:
    return cli_main(["train", "--base-model", str(base_dir), "--data", str(data), "--out", str(out),
                     "--device", "cpu", "--frames", "4", "--label-len", "3", "--positions", "6", "--bs", "2",
                     "--log-every", "1", *map(str, extra)])


def load_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# ---- data plan ---------------------------------------------------------------------------------

def test_label_windows_stop_at_turn_end_and_sequence_end():
    m = torch.tensor([0, 1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
    # t=1: m[2], m[3] set, m[4] not -> 2 labels; t=3: m[4]=0 -> none; t=5..: cut by the end of the sequence
    assert label_window_lengths(m, 3).tolist() == [0, 2, 1, 0, 0, 3, 2, 1, 0]


def test_batch_labels_are_the_base_tokens_after_x_t_plus_1(small_base, data_dir):
    seqs, _ = load_sequences([str(data_dir)], small_base, label_len=3, max_len=100)
    s = seqs[0]
    pos = sample_positions(s, 4, seed=0, epoch=1)
    assert torch.equal(pos, sample_positions(s, 4, seed=0, epoch=1))  # deterministic
    assert not torch.equal(pos, sample_positions(s, 4, seed=0, epoch=2)) or s.num_positions <= 4
    b = make_batch([s], [pos], 3, None)
    assert torch.equal(b.next_ids[0, : len(s.targets)], s.targets)  # x_{t+1} at t = the base's token there
    for i, t in enumerate(pos.tolist()):
        n = int(b.label_len[0, i])
        assert n >= 1 and b.labels[0, i, :n].tolist() == s.targets[t + 1: t + 1 + n].tolist()
        assert b.labels[0, i, n:].eq(0).all()


def test_stored_hidden_states_match_the_base(small_base, tmp_path):
    from ctc_drafter.training.data import HiddenReader

    d = make_shards(small_base, tmp_path / "h", n_seqs=3, hidden=True)
    seqs, _ = load_sequences([str(d)], small_base, label_len=3, max_len=100)
    b = make_batch(seqs, [sample_positions(s, 4, 0, 1) for s in seqs], 3, HiddenReader())
    h, _ = small_base.forward(b.input_ids, None)
    for i, s in enumerate(seqs):
        n = len(s.input_ids)
        torch.testing.assert_close(b.hidden[i, :n].float(), h[i, :n], atol=1e-2, rtol=1e-2)


def test_ctc_loss_matches_brute_force_alignment_sum():
    """The CTC loss is -log of the summed probability of every frame path that collapses to the labels."""
    import itertools

    from ctc_drafter.draft.ctc import collapse

    torch.manual_seed(0)
    V, L = 3, 4
    logits = torch.randn(1, L, V + 1)
    labels = torch.tensor([[1, 1]])  # a repeat needs a blank between
    lp = torch.log_softmax(logits, -1)[0]
    total = sum(torch.exp(sum(lp[t, s] for t, s in enumerate(path)))
                for path in itertools.product(range(V + 1), repeat=L) if collapse(path, blank=V) == [1, 1])
    got = ctc_loss(logits, labels, torch.tensor([2]), blank=V)
    torch.testing.assert_close(got, -torch.log(total))


def test_metrics_greedy_ctc_decode_prefix_and_accept_length():
    V, k = 5, 3
    big = 10.0
    # frames argmax: 1 1 blank 2 -> collapse [1, 2]; labels [1, 2, 3] -> 2 leading matches
    logits = torch.zeros(1, 1, 4, V + 1)
    for t, s in enumerate([1, 1, V, 2]):
        logits[0, 0, t, s] = big
    m = DraftMetrics(k)
    m.add(logits, torch.tensor([[[1, 2, 3]]]), torch.tensor([[3]]), V, ctc=True)
    s = m.summary()
    assert s["acc"] == [1.0, 1.0, 0.0] and s["exact"] == 0.0 and s["est_accept_len"] == 3.0
    m = DraftMetrics(k)
    m.add(logits, torch.tensor([[[1, 2, 0]]]), torch.tensor([[2]]), V, ctc=True)
    assert m.summary()["exact"] == 1.0


# ---- training ----------------------------------------------------------------------------------

@pytest.mark.parametrize("loss", ["ctc", "ce"])
def test_training_lowers_the_loss(small_model_dir, small_base, data_dir, tmp_path, loss):
    from ctc_drafter.draft.model import CTCDraftModel, new_draft_for

    out = tmp_path / f"ckpt_{loss}"
    assert train_cli(small_model_dir, data_dir, out, "--loss", loss, "--epochs", 4, "--lr", 1e-2,
                     "--eval-frac", 0.25) == 0
    seqs, _ = load_sequences([str(data_dir)], small_base, label_len=3, max_len=100)
    trained = CTCDraftModel.from_pretrained(out).bind(small_base.model)
    assert trained.config.loss == loss and trained.config.num_frames == 4
    untrained = new_draft_for(small_base, seed=0, num_frames=4, label_len=3, loss=loss)
    before = evaluate_draft(untrained, small_base, seqs, loss).summary()
    after = evaluate_draft(trained, small_base, seqs, loss).summary()
    assert after["loss"] < 0.8 * before["loss"], (before, after)
    log = read_log(out)
    steps = [r for r in log if r["event"] == "step"]
    epochs = [r for r in log if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3, 4] and len(steps) == epochs[-1]["step"]
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert epochs[-1]["eval"]["positions"] > 0 and epochs[-1]["est_accept_len"] >= 1.0
    assert len(epochs[-1]["train"]["acc"]) == 3
    assert all((out / f"epoch_{e}" / "model.safetensors").is_file() for e in (1, 2, 3, 4))
    torch.testing.assert_close(load_weights(out), load_weights(out / "epoch_4"))


def test_interrupt_then_recover_equals_uninterrupted_run(small_model_dir, data_dir, tmp_path, monkeypatch):
    import ctc_drafter.training.evaluate as tr  # the step's loss: draft_losses

    common = ("--epochs", 2, "--lr", 1e-3, "--eval-frac", 0, "--loss", "ctc+ce")
    straight = tmp_path / "straight"
    assert train_cli(small_model_dir, data_dir, straight, *common) == 0

    # Ctrl-C in the middle of epoch 2 (after 2 of its steps): epoch 1 must survive intact.
    real, steps_per_epoch = tr.compute_losses, 4  # 8 sequences, bs 2
    broken = tmp_path / "broken"
    interrupt_on_call(monkeypatch, tr, "compute_losses", steps_per_epoch + 3)
    assert train_cli(small_model_dir, data_dir, broken, *common) == 130
    monkeypatch.setattr(tr, "compute_losses", real)
    assert (broken / "state_1").is_dir() and not (broken / "state_2").exists()
    assert max(r["step"] for r in read_log(broken)) > steps_per_epoch  # the lost epoch had logged steps

    assert train_cli(small_model_dir, data_dir, broken, *common, "--recover", 1) == 0
    a, b = load_weights(straight / "epoch_2"), load_weights(broken / "epoch_2")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(load_weights(broken / "epoch_1")["fuse.weight"], b["fuse.weight"])
    torch.testing.assert_close(load_weights(broken), b)  # CKPT itself is the latest epoch again
    # the log matches the straight run's step for step (the interrupted epoch's lines were dropped)
    sl, bl = read_log(straight), read_log(broken)
    assert [(r["event"], r["step"]) for r in sl] == [(r["event"], r["step"]) for r in bl]
    assert [round(r["loss"], 4) for r in sl if r["event"] == "step"] == \
        [round(r["loss"], 4) for r in bl if r["event"] == "step"]

    # an existing run is never silently restarted, and a resume must use the same draft shape
    assert train_cli(small_model_dir, data_dir, broken, *common) == 2
    assert train_cli(small_model_dir, data_dir, broken, *common, "--recover", 1, "--frames", 5) == 2


@pytest.mark.slow  # accelerate launch: two processes
@pytest.mark.parametrize("extra", [[], ["--arch", "ar", "--positions", "all"]], ids=["nar", "ar-all"])
def test_accelerate_launch_two_cpu_processes(small_model_dir, data_dir, tmp_path, extra):
    # `accelerate launch --cpu --num_processes 2` starts ONE process unless mpirun is set up; torchrun's
    # launcher (--multi_gpu) with --device cpu runs real 2-process DDP over gloo on a machine without GPUs.
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "ctc_drafter.train",
           "--base-model", str(small_model_dir), "--data", str(data_dir), "--out", str(out), "--frames", "4",
           "--label-len", "3", "--positions", "4", "--bs", "1", "--epochs", "1", "--eval-frac", "0.25",
           "--log-every", "1", "--device", "cpu", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    state = json.loads((out / "state_1" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2
    # 6 training sequences over 2 processes x bs 1 -> 3 steps, each logged once (by the main process only)
    steps = [x for x in read_log(out) if x["event"] == "step"]
    assert [x["step"] for x in steps] == [1, 2, 3]
    assert (out / "state_1" / "random_states_1.pkl").is_file()  # both processes' RNG saved
    assert (out / "model.safetensors").is_file()


def test_trained_draft_loads_in_generate_and_ctcdrafter(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    from ctc_drafter.decoding import CTCDrafter

    out = tmp_path / "gen"
    assert train_cli(tiny_model_dir, tiny_data_dir, out, "--epochs", 1) == 0
    capsys.readouterr()
    assert cli_main(["generate", "--base-model", str(tiny_model_dir), "--draft-model", str(out), "--prompt", "hi",
                     "--max-new-tokens", "5", "--json", "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["new_tokens"] == 5 and res["draft_trained"] is True
    drafter = CTCDrafter.from_pretrained(str(tiny_model_dir), str(out / "epoch_1"), device="cpu")
    assert drafter.draft.config.num_frames == 4
    ids = drafter.base.tokenizer("hello there", return_tensors="pt").input_ids
    spec = drafter.generate(ids, max_new_tokens=8, speculative=True)
    plain = drafter.generate(ids, max_new_tokens=8, speculative=False)
    assert spec.tokens == plain.tokens  # lossless with the trained draft


# ---- bad input ---------------------------------------------------------------------------------

def _one_line_error(capsys, code: int, needle: str):
    # transformers' own "Loading weights" progress bar may precede the error when the base was loaded
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip() and "Loading weights" not in ln]
    assert code == 2
    assert len(err) == 1 and err[0].startswith("ctc-drafter: error:") and needle in err[0], err


def test_bad_inputs_exit_2_with_one_line(small_model_dir, tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    capsys.readouterr()
    _one_line_error(capsys, train_cli(tiny_model_dir, tmp_path / "nope", tmp_path / "o1"), "not found")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    _one_line_error(capsys, train_cli(tiny_model_dir, empty, tmp_path / "o2"), "manifest")
    other = make_shards(load_base_model(str(small_model_dir), device="cpu"), tmp_path / "other", n_seqs=2)
    _one_line_error(capsys, train_cli(tiny_model_dir, other, tmp_path / "o3"), "distilled from")
    base = load_base_model(str(tiny_model_dir), device="cpu")
    nothing = make_shards(base, tmp_path / "nothing", n_seqs=2, mask_from=1.0)  # no assistant tokens at all
    _one_line_error(capsys, train_cli(tiny_model_dir, nothing, tmp_path / "o4"), "no trainable positions")
    _one_line_error(capsys, train_cli(tiny_model_dir, tiny_data_dir, tmp_path / "o5", "--recover", 3), "state_3")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "manifest.json").write_text(json.dumps({"base": base.signature()}))
    (corrupt / "shard_00000.safetensors").write_bytes(b"not a shard")
    _one_line_error(capsys, train_cli(tiny_model_dir, corrupt, tmp_path / "o6"), "unreadable")
    _one_line_error(capsys, train_cli(tiny_model_dir, tiny_data_dir, tmp_path / "o7", "--loss", "ce", "--frames", 2),
                    "label_len")


def test_loss_parts_sum_for_ctc_plus_ce():
    torch.manual_seed(0)
    V = 7
    logits = torch.randn(2, 3, 4, V + 1)
    labels = torch.randint(0, V, (2, 3, 2))
    lens = torch.tensor([[2, 1, 0], [2, 2, 1]])
    both = compute_losses(logits, labels, lens, "ctc+ce", V)
    ctc = compute_losses(logits, labels, lens, "ctc", V)
    ce = compute_losses(logits, labels, lens, "ce", V)
    assert both.num_positions == 5
    torch.testing.assert_close(both.total, ctc.total + ce.total)
    with pytest.raises(CTCDrafterError):
        from ctc_drafter.training.data import split_eval
        split_eval([], 1.5, 0)


def test_tensorboard_gets_the_logged_scalars_when_installed(tmp_path, monkeypatch):
    import types

    from ctc_drafter.training.run_log import RunLog

    seen = []

    class FakeWriter:
        def __init__(self, logdir):
            self.logdir = logdir

        def add_scalar(self, tag, value, step):
            seen.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    log = RunLog(tmp_path, enabled=True)
    log.write({"event": "epoch", "epoch": 1, "step": 7, "train": {"loss": 2.5, "acc": [0.5, None]},
               "eval": {"est_accept_len": 1.75}, "est_accept_len": 1.75})
    assert ("epoch/train_loss", 2.5, 7) in seen and ("epoch/train_acc_1", 0.5, 7) in seen
    assert ("epoch/eval_est_accept_len", 1.75, 7) in seen and ("epoch/est_accept_len", 1.75, 7) in seen
    assert json.loads((tmp_path / "log.jsonl").read_text())["step"] == 7



def test_a_failing_tensorboard_writer_stops_tensorboard_not_the_log(tmp_path, monkeypatch, caplog):
    # Seen on a GPU machine (gVisor): the event file's write failed with ENOENT and ended the training run.
    import types

    from ctc_drafter.training.run_log import RunLog

    class BrokenWriter:
        def __init__(self, logdir):
            self.calls = 0

        def add_scalar(self, tag, value, step):
            self.calls += 1
            raise OSError(2, "No such file or directory")

        def flush(self):
            pass

        def close(self):
            raise OSError(2, "No such file or directory")

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=BrokenWriter))
    log = RunLog(tmp_path, enabled=True)
    with caplog.at_level("WARNING"):
        for step in (1, 2):
            log.write({"event": "step", "epoch": 1, "step": step, "loss": 1.0 / step})
    log.close()
    assert log.tb is None and "TensorBoard logging stopped" in caplog.text
    assert [json.loads(x)["step"] for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2]

# ---- proposal vocabulary (--draft-vocab) ---------------------------------------------------------

def test_symbol_labels_cut_windows_at_the_first_token_outside_the_vocabulary():
    from ctc_drafter.training.losses import symbol_labels

    t2s = torch.full((20,), -1)
    t2s[torch.tensor([1, 2, 4, 7])] = torch.arange(4)
    labels = torch.tensor([[[1, 2, 3], [4, 5, 6], [9, 1, 2], [7, 4, 0]]])
    lens = torch.tensor([[3, 2, 3, 2]])
    sym, loss_len = symbol_labels(labels, lens, t2s)
    assert sym.tolist() == [[[0, 1, -1], [2, -1, -1], [-1, 0, 1], [3, 2, -1]]]
    assert loss_len.tolist() == [[2, 1, 0, 2]]  # [7,4] is whole (the 0 past its length does not count)
    # a batch where no window can be learned gives a zero loss that still reaches every parameter
    lg = torch.randn(1, 4, 4, 5, requires_grad=True)
    lp = compute_losses(lg, sym.clamp(min=0), torch.zeros_like(loss_len), "ctc", 4)
    lp.total.backward()
    assert lp.num_positions == 0 and float(lp.total.detach()) == 0.0 and lg.grad is not None


def test_draft_vocab_trains_on_the_most_frequent_targets_and_saves_them(small_model_dir, small_base, data_dir,
                                                                         tmp_path, capsys):
    from ctc_drafter.draft.model import CTCDraftModel
    from ctc_drafter.training.data import split_eval

    out = tmp_path / "short"
    assert train_cli(small_model_dir, data_dir, out, "--draft-vocab", 40, "--epochs", 3, "--lr", 1e-2,
                     "--eval-frac", 0.25) == 0
    seqs, _ = load_sequences([str(data_dir)], small_base, label_len=3, max_len=100)
    train, _ = split_eval(seqs, 0.25, 0)
    counts = torch.zeros(256, dtype=torch.long)
    for s in train:
        counts += torch.bincount(s.targets[s.label_len > 0], minlength=256)
    draft = CTCDraftModel.from_pretrained(out).bind(small_base.model)
    ids = draft.vocab_ids
    assert draft.config.draft_vocab == 40 and ids.dtype == torch.long and ids.unique().numel() == 40
    outside = torch.ones(256, dtype=torch.bool)
    outside[ids] = False
    assert int(counts[ids].min()) >= int(counts[outside].max())  # the 40 most frequent, no rarer token
    frames = draft(torch.zeros(1, 5, small_base.config.hidden_size), torch.zeros(1, 5, dtype=torch.long),
                   torch.tensor([[0, 2]]))
    assert frames.shape[-1] == 41  # 40 tokens + blank
    epochs = [r for r in read_log(out) if r["event"] == "epoch"]
    assert epochs[-1]["train"]["loss"] < epochs[0]["train"]["loss"]
    # generation with it stays lossless and proposes only listed tokens
    from ctc_drafter.decoding import CTCDrafter

    drafter = CTCDrafter(small_base, draft, generator="beam", budget=8)
    ids_in = torch.tensor([[3, 17, 99, 5]])
    spec, plain = drafter.generate(ids_in, max_new_tokens=20), drafter.generate(ids_in, max_new_tokens=20,
                                                                                speculative=False)
    assert spec.tokens == plain.tokens
    # a vocabulary larger than the base's is refused with one line
    capsys.readouterr()
    _one_line_error(capsys, train_cli(small_model_dir, data_dir, tmp_path / "bad", "--draft-vocab", 999), "draft_vocab")


# ---- training speed: on-device metrics, the DataLoader ----------------------------------------------

def _reference_sums(logits, labels, label_len, V: int, ctc: bool) -> list[float]:
    """The metrics position by position in plain Python (the loop the on-device sums replaced)."""
    from ctc_drafter.draft.ctc import collapse

    k = labels.shape[-1]
    s = [0.0] * (4 + 2 * k)
    for lg, lab, n in zip(logits.flatten(0, 1), labels.flatten(0, 1).tolist(), label_len.flatten().tolist()):
        if n == 0:
            continue
        y = lab[:n]
        frames = lg.argmax(-1).tolist() if ctc else lg[:, :V].argmax(-1).tolist()
        d = collapse(frames, blank=V) if ctc else frames
        m = 0
        while m < min(len(d), n) and d[m] == y[m]:
            m += 1
        s[0] += 1
        s[1] += float((d if ctc else d[:n]) == y)
        s[2] += m + 1
        for j in range(n):
            s[4 + j] += float(m > j) if ctc else float(j < len(frames) and frames[j] == y[j])
            s[4 + k + j] += 1
    return s


@pytest.mark.parametrize("ctc", [True, False])
@pytest.mark.parametrize("frames", [2, 5])
def test_device_metric_sums_equal_the_per_position_reference(ctc, frames):
    from ctc_drafter.training.metrics import batch_sums

    torch.manual_seed(frames + 10 * ctc)
    V, k = 4, 3  # a small vocabulary: repeats, blanks and hits all happen often
    logits = torch.randn(3, 7, frames, V + 1)
    labels = torch.randint(-1, V, (3, 7, k))  # -1: a token outside the proposal vocabulary (always a miss)
    lens = torch.randint(0, k + 1, (3, 7))  # 0 = padding position
    got = batch_sums(logits, labels, lens, V, ctc)
    assert got.dtype == torch.long
    assert got.tolist() == _reference_sums(logits, labels, lens, V, ctc)
    m = DraftMetrics(k)
    m.add_sums(got)
    m.add(logits, labels, lens, V, ctc)  # the two entry points add the same sums
    assert m.sums.tolist() == [2 * x for x in got.tolist()]


def test_loader_batches_equal_make_batch_in_plan_order(small_base, tmp_path):
    from ctc_drafter.training.data import HiddenReader, batch_loader

    d = make_shards(small_base, tmp_path / "h", n_seqs=6, hidden=True)
    seqs, _ = load_sequences([str(d)], small_base, label_len=3, max_len=100)
    plan = [[seqs[4], seqs[0]], [seqs[1], seqs[5], seqs[2]], [seqs[3]]]
    reader = HiddenReader()
    want = [make_batch(p, [sample_positions(s, 4, 7, 2) for s in p], 3, reader) for p in plan]
    for workers in (0, 1):
        got = list(batch_loader(plan, 3, 4, seed=7, epoch=2, workers=workers, pin_memory=False))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.num_sequences == w.num_sequences and g.hidden is not None
            for name in ("input_ids", "next_ids", "hidden", "positions", "labels", "label_len"):
                assert torch.equal(getattr(g, name), getattr(w, name)), (workers, name)


def test_loader_workers_give_the_same_run(small_model_dir, data_dir, tmp_path):
    """Reading batches in a worker process changes nothing: same log numbers, same weights."""
    outs = []
    for workers in (0, 1):
        out = tmp_path / f"w{workers}"
        assert train_cli(small_model_dir, data_dir, out, "--epochs", 2, "--eval-frac", 0.25,
                         "--loader-workers", workers) == 0
        outs.append(out)
    a, b = read_log(outs[0]), read_log(outs[1])
    strip = lambda r: {k: v for k, v in r.items() if k not in ("seq_per_s", "pos_per_s", "train_s", "s_per_seq")}  # noqa: E731
    assert [strip(r) for r in a] == [strip(r) for r in b]
    assert all("acc" in r and r["positions"] > 0 for r in a if r["event"] == "step")
    wa, wb = load_weights(outs[0]), load_weights(outs[1])
    assert all(torch.equal(wa[n], wb[n]) for n in wa)


@pytest.mark.parametrize("kind", FAKE_CPUS)
def test_auto_precision_is_bf16_autocast_on_a_cpu_with_bf16_units(monkeypatch, kind):
    """auto trains in bf16 autocast on a CPU with AMX or AVX512-BF16 (no tree pass to keep exact), in fp32
    without either (bf16 is emulated there); an explicit dtype and `accelerate launch`'s choice stand."""
    import argparse

    import ctc_drafter.training.options as tr

    cpu, dev = FAKE_CPUS[kind], torch.device("cpu")
    auto = argparse.Namespace(dtype="auto")
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    want = (torch.bfloat16, "bf16") if kind in ("amx", "avx512_bf16") else (torch.float32, "no")
    assert tr.precision(auto, dev, cpu) == want
    assert tr.precision(argparse.Namespace(dtype=None), dev, cpu) == want
    assert tr.precision(argparse.Namespace(dtype="float32"), dev, cpu) == (torch.float32, "no")  # asked: kept
    assert tr.precision(argparse.Namespace(dtype="bfloat16"), dev, cpu) == (torch.bfloat16, "bf16")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # `accelerate launch --mixed_precision no` decides
    assert tr.precision(auto, dev, cpu) == (torch.float32, "no")


def test_train_options_are_defined_once_for_the_cli_and_the_api():
    """The command line is made from TrainOptions: its defaults are the API's, and every field is an option."""
    from dataclasses import fields

    from ctc_drafter.cli.main import build_parser
    from ctc_drafter.training.options import TrainOptions

    args = build_parser().parse_args(["train", "--data", "d1", "--data", "d2", "--out", "ckpt"])
    assert TrainOptions.from_args(args) == TrainOptions(data=["d1", "d2"], out="ckpt")
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--ctc-weight", "0", "--bs", "8",
                                      "--allow-incomplete"])
    opts = TrainOptions.from_args(args)
    assert (opts.ctc_weight, opts.bs, opts.allow_incomplete, opts.epochs) == (0.0, 8, True, 2)
    assert {f.name for f in fields(TrainOptions)} <= set(vars(args))
