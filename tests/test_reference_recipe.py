"""`train --preset reference`: the reference code's layout (draft/eagle1_model.py), its losses
(training/reference_losses.py: the 6-over-3 CTC window, soft-target CE, input noise), its optimiser and
schedule, training end to end on a distilled folder, and lossless decoding with the result."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_llama
from ctc_drafter.cli.main import build_parser
from ctc_drafter.cli.main import main as cli_main
from ctc_drafter.decoding import CTCDrafter
from ctc_drafter.decoding.proposers import ARProposer, MedusaTree, make_proposer
from ctc_drafter.draft import (DraftCache, DraftConfig, Eagle1DraftModel, load_draft, load_draft_folder,
                               new_eagle1_draft_for)
from ctc_drafter.errors import CTCDrafterError
from ctc_drafter.models.base import BaseModel, load_base_model
from ctc_drafter.training.options import GIVEN, TrainOptions
from ctc_drafter.training.presets import REFERENCE, apply_preset
from ctc_drafter.training.reference_data import reference_trained
from ctc_drafter.training.reference_losses import (add_uniform_noise, ctc_window_starts, draft_input,
                                                   reference_ctc_loss, reference_losses)
from test_exactness import hf_greedy
from test_train import (data_dir, make_shards, one_thread, read_log, small_base,  # noqa: F401 (fixtures)
                        small_model_dir, tiny_data_dir)


def _toy(seed=1, draft_seed=0):
    base = BaseModel(tiny_llama(seed=seed), None, "toy")
    return base, new_eagle1_draft_for(base, seed=draft_seed)


# ---- the layout ----------------------------------------------------------------------------------

def test_state_dict_is_fc_and_one_layer_without_input_norm_final_norm_head_or_embedding(tmp_path):
    base, draft = _toy()
    d, c = draft.config.hidden_size, draft.config
    shapes = {k: tuple(v.shape) for k, v in draft.state_dict().items()}
    hd, kv = c.head_dim, c.num_key_value_heads
    assert shapes == {
        "fuse.weight": (d, 2 * d), "fuse.bias": (d,),
        "layers.0.attn.q_proj.weight": (c.num_attention_heads * hd, d), "layers.0.attn.k_proj.weight": (kv * hd, d),
        "layers.0.attn.v_proj.weight": (kv * hd, d), "layers.0.attn.o_proj.weight": (d, c.num_attention_heads * hd),
        "layers.0.post_norm.weight": (d,), "layers.0.gate.weight": (c.intermediate_size, d),
        "layers.0.up.weight": (c.intermediate_size, d), "layers.0.down.weight": (d, c.intermediate_size)}
    assert (c.layout, c.architecture, c.num_frames, c.label_len, c.draft_vocab) == ("eagle1", "ar", 4, 3, 0)
    draft.save_pretrained(tmp_path / "d")
    assert json.loads((tmp_path / "d" / "config.json").read_text())["layout"] == "eagle1"
    back = load_draft_folder(tmp_path / "d", dtype=torch.float64)
    assert type(back) is Eagle1DraftModel
    assert all(torch.equal(back.state_dict()[k], v) for k, v in draft.state_dict().items())
    # a standard draft's config does not gain the field: older configs and states still match
    assert "layout" not in DraftConfig.from_base_config(base.config).to_dict()
    with pytest.raises(CTCDrafterError, match="eagle1"):
        DraftConfig.from_base_config(base.config, layout="eagle1", architecture="nar")


def test_fc_reads_the_token_embedding_first_and_the_head_is_the_bases_without_a_norm():
    base, draft = _toy()
    d = draft.config.hidden_size
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, 5, d, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 64, (1, 5), generator=g)
    with torch.no_grad():
        draft.fuse.weight.zero_()
        draft.fuse.weight[:, :d] = torch.eye(d, dtype=torch.float64)  # keep the first half of the concat only
        emb = base.model.get_input_embeddings()(ids)
        assert torch.allclose(draft._fuse(h, ids), emb + draft.fuse.bias)
        f = torch.randn(1, 3, d, generator=g, dtype=torch.float64)
        assert torch.equal(draft.frame_logits(f)[..., 1:-1], base.model.lm_head(f)[..., 1:])  # no norm before it
        assert torch.equal(draft.frame_logits(f)[..., -1], base.model.lm_head(f)[..., 0])  # token 0 is the blank
        assert bool((draft.frame_logits(f)[..., 0] == -math.inf).all())


def test_levels_equal_a_fresh_pass_fed_each_levels_own_top1_token_blank_included():
    """topK_genrate: level j+1 reads level j's feature and its top-1 over the whole vocabulary; when that
    is token 0 (the blank) the blank is what the next level reads."""
    base, draft = _toy()
    head = draft._proposal_head()

    def blank_first(f):  # token 0 on top at every level
        logits = head(f).clone()
        logits[..., 0] = logits.max(-1).values + 1.0
        return logits

    g = torch.Generator().manual_seed(0)
    T, d = 7, draft.config.hidden_size
    hidden = torch.randn(1, T, d, generator=g, dtype=torch.float64)
    next_ids = torch.randint(1, 64, (1, T), generator=g)
    for proposal_head in (head, blank_first):
        draft._proposal_head = lambda h=proposal_head: h
        cache = DraftCache()
        f_last = draft.extend(hidden, next_ids, cache)
        rows = draft.levels(f_last, cache, 4)[0]  # [4, V+1]
        assert cache.length == T
        H, ids, f = hidden, next_ids, draft(hidden, next_ids).features[:, -1:]
        for j in range(4):
            logits = proposal_head(f)
            want = torch.log_softmax(draft._rows(logits).float(), -1)[0, 0]
            assert torch.allclose(rows[j], want, atol=1e-9)
            tok = logits.argmax(-1)
            assert (int(tok) == 0) == (proposal_head is blank_first)
            H, ids = torch.cat([H, f], 1), torch.cat([ids, tok], 1)
            f = draft(H, ids).features[:, -1:]
    del draft._proposal_head


def test_medusa_tree_is_the_reference_tree_and_the_eagle1_default_proposer():
    from ctc_drafter.decoding.proposers import MEDUSA_63

    base, draft = _toy()
    p = make_proposer("ctc", draft)  # no generator named: the reference's, on any device
    assert isinstance(p, ARProposer) and isinstance(p.policy, MedusaTree) and p.policy.ctc
    assert p.min_path_prob == 0 and p.levels == 4 and p.policy.choices == MEDUSA_63 and p.policy.topk == 10


def _reference_transform(root_and_paths: list[list[int]], blank: int = 0) -> set[tuple[int, ...]]:
    """The evaluation scripts' CTC_transform on each path's tokens (root excluded): a token equal to its
    predecessor in the path becomes blank, then blanks are squeezed out."""
    out = set()
    for path in root_and_paths:
        marked = [blank if i and path[i] == path[i - 1] else t for i, t in enumerate(path)]
        out.add(tuple(t for t in marked if t != blank))
    return out


def test_medusa_policy_with_collapse_proposes_the_reference_transforms_sequences():
    """From the same level rows, the tree's root-to-node paths are exactly the prefixes of the reference's
    transformed candidates (blank = token 0 moved to the last column)."""
    g = torch.Generator().manual_seed(3)
    V = 12
    for trial in range(20):
        logits = torch.randn(4, V, generator=g) * 3
        if trial % 2:
            logits[1:, :] = logits[0]  # every level alike: paths such as (a, a, a) collapse
        logits[trial % 4, 0] = logits[trial % 4].max() + 1  # the blank on top of one level
        top = logits.topk(10, -1).indices.tolist()
        paths = [[top[f][r] for f, r in enumerate(c)] for c in MedusaTree().choices]
        want = set()
        for s in _reference_transform(paths):
            want |= {s[:i] for i in range(1, len(s) + 1)}
        rows = torch.log_softmax(Eagle1DraftModel._rows(logits), -1)
        tree = MedusaTree().build(root=99, frame_logprobs=rows, max_depth=8, budget=64)
        got = {p for p in tree.prefixes() if p}
        assert got == want


def test_medusa_policy_without_the_transform_proposes_each_path_literally():
    """--ctc-transform off: the tree's root-to-node paths are exactly the prefixes of the 63 paths over each
    level's top-10 tokens without the blank column: repeats kept, token 0 (the blank) never proposed."""
    g = torch.Generator().manual_seed(4)
    V = 12
    for trial in range(10):
        logits = torch.randn(4, V, generator=g) * 3
        logits[1:, :] = logits[0]  # every level alike: the literal paths repeat tokens
        logits[trial % 4, 0] = logits[trial % 4].max() + 1  # the blank on top of one level
        no_blank = logits.clone()
        no_blank[:, 0] = float("-inf")
        top = no_blank.topk(10, -1).indices.tolist()
        paths = [tuple(top[f][r] for f, r in enumerate(c)) for c in MedusaTree().choices]
        want = {p[:i] for p in paths for i in range(1, len(p) + 1)}
        rows = torch.log_softmax(Eagle1DraftModel._rows(logits), -1)
        got = {p for p in MedusaTree(ctc=False).build(root=99, frame_logprobs=rows, max_depth=8, budget=64).prefixes()
               if p}
        assert got == want
        a = top[0][0]
        assert (a, a, a, a) in got and all(0 not in p for p in got)  # path [0,0,0,0] uncollapsed, no blank
        collapsed = MedusaTree().build(root=99, frame_logprobs=rows, max_depth=8, budget=64).prefixes()
        assert (a, a, a, a) not in collapsed  # on: 4 frames emit at most 2 equal tokens (a, blank, a)


def test_ctc_transform_option_reaches_the_tree_policy():
    base, draft = _toy()
    assert make_proposer("ctc", draft).policy.ctc  # auto: the eagle1 draft is trained with a blank
    off = make_proposer("hybrid", draft, "medusa", ctc_transform=False)
    assert [p.policy.ctc for p in off.parts if hasattr(p, "policy")] == [False]
    assert off.describe()["ctc_transform"] is False
    ce = new_eagle1_draft_for(base, loss="ce")
    assert not make_proposer("ctc", ce).policy.ctc
    with pytest.raises(CTCDrafterError, match="needs a draft trained with a blank"):
        make_proposer("ctc", ce, ctc_transform=True)


# ---- the losses ----------------------------------------------------------------------------------

def _reference_windows(mask: list[bool], fixlen: int = 3) -> list[int]:
    """slice_func_fix over find_start_end_indices(loss_mask[:-5]), written out plainly."""
    starts, i = [], 0
    for v, grp in itertools.groupby(enumerate(mask[:-5]), key=lambda x: x[1]):
        idx = [t for t, _ in grp]
        if v and idx[-1] - idx[0] >= fixlen:
            starts += [p for p in idx if p + fixlen - 1 <= idx[-1]]
    return starts


def test_ctc_windows_are_the_references_runs_of_six_frames_over_three_labels():
    g = torch.Generator().manual_seed(0)
    for T in (1, 5, 6, 9, 12, 30):
        for _ in range(40):
            mask = torch.rand(T, generator=g) < 0.75
            assert ctc_window_starts(mask) == _reference_windows(mask.tolist())
    m = torch.tensor([0, 1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0], dtype=torch.bool)
    assert ctc_window_starts(m) == [5, 6, 7]  # a 3-run gives none; the 5-run keeps its labels inside it


def _brute_force_nll(logp: torch.Tensor, labels: list[int], blank: int = 0) -> float:
    """-log of the summed probability of every frame path that collapses to `labels`."""
    W, V = logp.shape
    total = 0.0
    for path in itertools.product(range(V), repeat=W):
        out, prev = [], None
        for s in path:
            if s != prev and s != blank:
                out.append(s)
            prev = s
        if out == labels:
            total += math.exp(sum(float(logp[w, s]) for w, s in enumerate(path)))
    return -math.log(total)


@pytest.mark.parametrize("labels", [[1, 2, 3], [2, 2, 3], [4, 4, 4], [1, 3, 1]])
def test_ctc_term_equals_brute_force_alignment_sum_and_torch_ctc(labels):
    """A run of 4 trained positions p..p+3: windows at p and p+1, each 6 frames against the base's greedy
    tokens at its first 3 positions (the first window's are `labels`)."""
    V, T, p = 5, 12, 2
    g = torch.Generator().manual_seed(sum(labels))
    logits = torch.randn(1, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    greedy = torch.randint(1, V, (1, T), generator=g)
    greedy[0, p: p + 3] = torch.tensor(labels)
    trained = torch.zeros(1, T, dtype=torch.bool)
    trained[0, p: p + 4] = True
    logp = torch.log_softmax(logits, -1)
    loss, n = reference_ctc_loss(logp, greedy, trained, torch.tensor([T]))
    assert n == 2
    brute = [_brute_force_nll(logp[0, q: q + 6].detach(), greedy[0, q: q + 3].tolist()) / 3 for q in (p, p + 1)]
    assert float(loss.detach()) == pytest.approx(sum(brute) / 2, rel=1e-9)
    # nn.CTCLoss(blank=0, reduction="mean") on the full vocabulary, as the reference calls it
    frames = torch.stack([logp[0, p: p + 6], logp[0, p + 1: p + 7]], 1)  # [6,2,V]
    want = F.ctc_loss(frames, torch.stack([greedy[0, p: p + 3], greedy[0, p + 1: p + 4]]), torch.tensor([6, 6]),
                      torch.tensor([3, 3]), blank=0)
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-9)
    (g1,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (g2,) = torch.autograd.grad(want, logits)
    assert torch.allclose(g1, g2, atol=1e-9)


def test_ctc_term_is_the_mean_over_every_window_of_the_batch():
    V, T = 6, 14
    g = torch.Generator().manual_seed(5)
    logp = torch.log_softmax(torch.randn(2, T, V, generator=g, dtype=torch.float64), -1)
    greedy = torch.randint(1, V, (2, T), generator=g)
    trained = torch.rand(2, T, generator=g) < 0.8
    lengths = torch.tensor([T, T - 3])
    trained[1, T - 3:] = False
    loss, n = reference_ctc_loss(logp, greedy, trained, lengths)
    windows = [(b, p) for b in range(2) for p in _reference_windows(trained[b, : int(lengths[b])].tolist())]
    assert n == len(windows) > 0
    want = sum(_brute_force_nll(logp[b, p: p + 6], greedy[b, p: p + 3].tolist()) / 3 for b, p in windows) / n
    assert float(loss) == pytest.approx(want, rel=1e-9)


def test_soft_target_ce_and_feature_loss_by_hand():
    g = torch.Generator().manual_seed(1)
    B, T, d, V = 2, 5, 4, 7
    head = torch.nn.Linear(d, V, bias=False).double().requires_grad_(False)
    features = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    hidden = torch.randn(B, T, d, generator=g, dtype=torch.float64)
    logits = head(features)
    trained = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    lp = reference_losses(features, logits, hidden, trained, torch.tensor([5, 3]), head,
                          {"feature": 1.0, "token": 0.1, "ctc": 0.0})
    token = feature = 0.0
    pos = [(b, t) for b in range(B) for t in range(T) if trained[b, t]]
    for b, t in pos:
        p = torch.softmax(head(hidden[b, t + 1]), -1)  # the base's own distribution at h_{t+1}
        q = torch.log_softmax(logits[b, t], -1)
        token += -float((p * q).sum())
        diff = (features[b, t] - hidden[b, t + 1]).abs()
        feature += float(torch.where(diff < 1, 0.5 * diff ** 2, diff - 0.5).mean())
    n = len(pos) + 1e-5
    assert lp.parts["token"] == pytest.approx(token / n, rel=1e-9)
    assert lp.parts["feature"] == pytest.approx(feature / n, rel=1e-9)
    assert float(lp.total) == pytest.approx(feature / n + 0.1 * token / n, rel=1e-9)
    assert lp.num_positions == len(pos) and "ctc" not in lp.parts


def test_trained_positions_are_the_references_mask():
    """Our mask marks t when token t+1 is an assistant token; the reference's marks token t itself, and
    drops the last position."""
    m = torch.tensor([0, 0, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    assert reference_trained(m).tolist() == [False, False, False, True, True, True, False, False]


def test_uniform_noise_only_while_training_at_the_references_scale():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 64, 8, generator=g)
    lengths = torch.tensor([64, 16])
    assert draft_input(hidden, lengths, training=False, std=0.2) is hidden
    torch.manual_seed(0)
    noise = draft_input(hidden, lengths, training=True, std=0.2) - hidden
    for b, T in enumerate(lengths.tolist()):
        half = 0.2 * 512 / T / 2  # U(-1/2, 1/2) * std * 512 / T
        assert float(noise[b].abs().max()) <= half + 1e-6
        assert float(noise[b].abs().max()) > 0.9 * half  # it is uniform over the whole range, not smaller
        assert abs(float(noise[b].mean())) < 0.1 * half
    assert draft_input(hidden, lengths, training=True, std=0.0) is hidden
    torch.manual_seed(1)
    assert not torch.equal(add_uniform_noise(hidden, lengths), hidden + noise)


# ---- the preset, training, decoding ---------------------------------------------------------------

def test_preset_fills_what_the_command_line_did_not_give():
    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--preset", "reference", "--lr", "1e-4",
                                      "--bs", "4", "--ctc-weight", "0"])
    opts = apply_preset(TrainOptions.from_args(args), getattr(args, GIVEN))
    assert (opts.lr, opts.bs, opts.ctc_weight) == (1e-4, 4, 0.0)  # given, even --bs 4 (the plain default)
    for k in ("layout", "arch", "clip", "grad_clip", "warmup", "lr_schedule", "schedule_steps", "weight_decay",
              "input_noise", "epochs", "max_len", "feature_weight", "token_weight", "frames", "label_len"):
        assert getattr(opts, k) == REFERENCE[k]
    api = apply_preset(TrainOptions(data=["d"], out="o", preset="reference", epochs=3))
    assert (api.epochs, api.lr, api.bs) == (3, 3e-5, 1)
    assert apply_preset(TrainOptions(data=["d"], out="o")) == TrainOptions(data=["d"], out="o")


def test_preset_optimiser_schedule_and_clipping(small_model_dir, data_dir, tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from ctc_drafter.training.data import load_sequences
    from ctc_drafter.training.options import config_overrides
    from ctc_drafter.training.reference_trainer import ReferenceTrainer

    opts = apply_preset(TrainOptions(data=[str(data_dir)], out=str(tmp_path / "o"), preset="reference"))
    over, kind = config_overrides(opts)
    assert over["extra"]["ar_loss_weights"] == {"feature": 1.0, "token": 0.1, "ctc": 0.01}
    assert (over["layout"], over["loss"], over["num_frames"], over["label_len"]) == ("eagle1", "ctc", 4, 3)
    base = load_base_model(str(small_model_dir), device="cpu", dtype="float32")
    draft = new_eagle1_draft_for(base, **over).float()
    seqs, _ = load_sequences(opts.data, base, 3, opts.max_len)
    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator(cpu=True, step_scheduler_with_optimizer=False)
    try:
        tr = ReferenceTrainer(opts, acc, base, draft, kind, seqs, [], "fp", tmp_path / "o")
        group = tr.optimizer.optimizer.param_groups[0]
        assert type(tr.optimizer.optimizer) is torch.optim.AdamW
        assert (group["lr"] * 0, group["betas"], group["weight_decay"]) == (0.0, (0.9, 0.95), 0.01)
        factor = tr.scheduler.scheduler.lr_lambdas[0]
        assert [factor(s) for s in (0, 1000, 2000, 401_000, 800_000)] == pytest.approx([0, 0.5, 1, 0.5, 0])
        assert tr.scheduler.scheduler.base_lrs == [3e-5]
        for p in tr.model.parameters():
            p.grad = torch.full_like(p, 3.0)
            p.grad.view(-1)[0] = -7.0
        before = next(tr.model.parameters()).grad.clone()
        tr.clip_gradients()
        assert all(float(p.grad.abs().max()) == 0.5 for p in tr.model.parameters())  # each element, by value
        assert torch.equal(next(tr.model.parameters()).grad, before.clamp(-0.5, 0.5))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("budget,generator", [(64, None), (20, "medusa"), (6, "prefix")])
def test_untrained_eagle1_speculative_equals_hf_generate(budget, generator):
    base, draft = _toy()
    g = torch.Generator().manual_seed(budget)
    for _ in range(3):
        ids = torch.randint(0, 64, (1, 6), generator=g)
        drafter = CTCDrafter(base, draft, generator=generator, budget=budget, proposer="ctc")
        spec = drafter.generate(ids, max_new_tokens=30)
        assert spec.tokens == drafter.generate(ids, 30, speculative=False).tokens == hf_greedy(base.model, ids, 30)
    hybrid = CTCDrafter(base, draft, budget=16, proposer="hybrid")
    assert hybrid.generate(ids, max_new_tokens=30).tokens == hf_greedy(base.model, ids, 30)
    for transform in (True, False):  # --ctc-transform on / off: lossless either way
        d = CTCDrafter(base, draft, generator=generator, budget=budget, proposer="ctc", ctc_transform=transform)
        assert d.settings()["ctc_transform"] is transform
        assert d.generate(ids, 30).tokens == hf_greedy(base.model, ids, 30)
    assert CTCDrafter(base, draft, budget=16, proposer="hybrid", ctc_transform=False).generate(ids, 30).tokens == \
        hf_greedy(base.model, ids, 30)


def test_untrained_eagle1_loads_by_name():
    base = BaseModel(tiny_llama(seed=1), None, "toy")
    draft, trained = load_draft("untrained-eagle1", base, quiet=True)
    assert type(draft) is Eagle1DraftModel and not trained


def test_train_preset_reference_end_to_end_then_generate_is_lossless(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    out = tmp_path / "ref"
    assert cli_main(["train", "--preset", "reference", "--base-model", str(tiny_model_dir), "--data",
                     str(tiny_data_dir), "--out", str(out), "--device", "cpu", "--epochs", "1", "--eval-frac", "0.3",
                     "--log-every", "1", "--dtype", "float32"]) == 0
    args = json.loads((out / "train_args.json").read_text())
    assert args["preset"] == "reference" and args["epochs"] == 1  # given, over the preset's 20
    for k in ("lr", "bs", "clip", "grad_clip", "warmup", "lr_schedule", "schedule_steps", "weight_decay",
              "input_noise", "max_len", "ctc_weight", "token_weight", "feature_weight"):
        assert args[k] == REFERENCE[k]
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["layout"], cfg["architecture"], cfg["loss"], cfg["extra"]["preset"]) == ("eagle1", "ar", "ctc",
                                                                                        "reference")
    log = read_log(out)
    steps = [r for r in log if r["event"] == "step"]
    assert steps and all(math.isfinite(r["loss"]) and {"feature", "token", "acc"} <= set(r) for r in steps)
    assert all(r["pos_per_s"] > 0 for r in steps)  # trained positions, from the losses' weight
    assert steps[0]["lr"] == 0.0  # transformers' linear warmup starts from 0
    epoch = [r for r in log if r["event"] == "epoch"][0]
    assert epoch["eval"]["loss"] >= 0 and 0 <= epoch["eval"]["acc"] <= 1
    capsys.readouterr()
    assert cli_main(["generate", "--base-model", str(tiny_model_dir), "--draft-model", str(out), "--prompt", "hi",
                     "--max-new-tokens", "5", "--json", "--device", "cpu", "--proposer", "ctc"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["new_tokens"] == 5 and res["draft_trained"] is True and res["ctc_transform"] is True
    assert cli_main(["generate", "--base-model", str(tiny_model_dir), "--draft-model", str(out), "--prompt", "hi",
                     "--max-new-tokens", "5", "--json", "--device", "cpu", "--proposer", "ctc",
                     "--ctc-transform", "off"]) == 0
    off = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert off["ctc_transform"] is False and off["text"] == res["text"]
    drafter = CTCDrafter.from_pretrained(str(tiny_model_dir), str(out), device="cpu", proposer="ctc",
                                         generator="medusa")
    assert type(drafter.draft) is Eagle1DraftModel and drafter.budget == 64
    ids = drafter.base.tokenizer("hello there", return_tensors="pt").input_ids
    spec = drafter.generate(ids, max_new_tokens=12)
    assert spec.tokens == drafter.generate(ids, 12, speculative=False).tokens == hf_greedy(drafter.base.model, ids, 12)


def test_reference_training_lowers_the_loss_and_stays_lossless(small_model_dir, data_dir, tmp_path):
    """A few epochs at a higher rate than the preset's (its warmup alone is 2000 steps) on the vocab-256 base."""
    out = tmp_path / "fit"
    assert cli_main(["train", "--preset", "reference", "--base-model", str(small_model_dir), "--data", str(data_dir),
                     "--out", str(out), "--device", "cpu", "--epochs", "6", "--lr", "1e-2", "--warmup", "2",
                     "--eval-frac", "0", "--dtype", "float32", "--log-every", "100"]) == 0
    epochs = [r for r in read_log(out) if r["event"] == "epoch"]
    assert epochs[-1]["train"]["loss"] < 0.8 * epochs[0]["train"]["loss"]
    assert "ctc" in epochs[-1]["train"]
    drafter = CTCDrafter.from_pretrained(str(small_model_dir), str(out), device="cpu", proposer="ctc")
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        ids = torch.randint(0, 200, (1, 8), generator=g)
        assert drafter.generate(ids, max_new_tokens=20).tokens == hf_greedy(drafter.base.model, ids, 20)


def test_reference_training_reads_stored_fp16_hidden_states_under_bf16_autocast(small_model_dir, small_base,
                                                                                tmp_path):
    data = make_shards(small_base, tmp_path / "data", n_seqs=4, hidden=True)
    out = tmp_path / "bf16"
    assert cli_main(["train", "--preset", "reference", "--base-model", str(small_model_dir), "--data", str(data),
                     "--out", str(out), "--device", "cpu", "--epochs", "1", "--dtype", "bfloat16",
                     "--eval-frac", "0.25", "--log-every", "1"]) == 0
    args = json.loads((out / "train_args.json").read_text())
    assert args["mixed_precision"] == "bf16"
    epoch = [r for r in read_log(out) if r["event"] == "epoch"][0]
    assert math.isfinite(epoch["train"]["loss"]) and math.isfinite(epoch["eval"]["loss"])


def test_reference_run_resumed_equals_the_uninterrupted_run(small_model_dir, data_dir, tmp_path):
    """--recover restores the schedule, the optimiser and the noise's random state: the same weights."""
    from test_train import load_weights

    common = ["train", "--preset", "reference", "--base-model", str(small_model_dir), "--data", str(data_dir),
              "--device", "cpu", "--lr", "1e-2", "--warmup", "2", "--eval-frac", "0", "--dtype", "float32",
              "--loader-workers", "0"]
    assert cli_main([*common, "--out", str(tmp_path / "a"), "--epochs", "2"]) == 0
    assert cli_main([*common, "--out", str(tmp_path / "b"), "--epochs", "1"]) == 0
    assert cli_main([*common, "--out", str(tmp_path / "b"), "--epochs", "2", "--recover", "1"]) == 0
    a, b = load_weights(tmp_path / "a"), load_weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["fuse.weight"], load_weights(tmp_path / "b" / "epoch_1")["fuse.weight"])
