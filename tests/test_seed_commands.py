"""The seed repository's commands, typed as its README writes them, run through seed/ on a tiny base:
the data step makes our distill folder, training numbers state_N as the seed does and --recover N
continues it, the evaluation scripts write the seed's answer files; plus the option mappings."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ctc_drafter.cli import seed
from ctc_drafter.cli.main import main
from ctc_drafter.draft.config import DraftConfig
from ctc_drafter.errors import CTCDrafterError

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
LAST_EPOCH = seed.SEED_LAST_EPOCH  # the seed trains epochs 0..20

# The seed README's command blocks as it prints them (github.com/ZhuofanWen/CTC-drafter, README.md),
# each run from the folder the README has `cd`-ed into. Model and data names are its own: the tests
# link them to a tiny base and a ShareGPT excerpt. Note `vc_7b\` before a line break: bash joins it
# with the next line into `vc_7b--tree-choices`, which the evaluation scripts split back.
DATA_STEP = ("seed/ge_data", """python allocation.py --outdir train_data_vicuna7b \\
--type vicuna \\
--basemodel vicuna-7b-v1.3 \\
--data ShareGPT_V4.3_unfiltered_cleaned_split.json
""")
TRAIN = ("seed", """accelerate launch --mixed_precision=bf16 train/main.py \\
--tmpdir train_data_vicuna7b \\
--cpdir checkpoint_7b_vicuna \\
--basepath vicuna-7b-v1.3 \\
--configpath train/vicuna_7B_config.json \\
--bs 1  
""")
RECOVER = ("seed", """accelerate launch --mixed_precision=bf16 train/main.py \\
--tmpdir train_data_vicuna7b \\
--cpdir checkpoint_7b_vicuna \\
--basepath vicuna-7b-v1.3 \\
--configpath train/vicuna_7B_config.json \\
--bs 1  \\
--recover 2
""")
# The README's evaluation lines; the tests add the seed's own --max-new-token (a random tiny base never
# ends an answer, and its second turn must fit the context after the first).
EVAL = ("seed/evaluation/MT-bench", """python scripts/vicuna.py \\
--draft-model-path checkpoint_7b_vicuna \\
--base-model-path vicuna-7b-v1.3 \\
--model-id  vc_7b\\
--tree-choices medusa \\
--bench-name mt_bench \\
--use-safetensor-weight True --max-new-token 12
""")
EVAL_BASELINE = ("seed/evaluation/MT-bench", """python scripts/vicuna_baseline.py \\
--draft-model-path checkpoint_7b_vicuna \\
--base-model-path vicuna-7b-v1.3 \\
--model-id  vc_7b_baseline\\
--tree-choices medusa \\
--bench-name mt_bench \\
--use-safetensor-weight True --max-new-token 12
""")


def llama_draft_config(base_dir: Path) -> dict:
    """A draft config in the seed's format (train/vicuna_7B_config.json) for the tiny base."""
    cfg = json.loads((REPO / "seed/train/vicuna_7B_config.json").read_text())
    base = json.loads((base_dir / "config.json").read_text())
    cfg.update({k: base[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")})
    return cfg


@pytest.fixture(scope="module")
def checkout(tmp_path_factory, tiny_model_dir):
    """A copy of seed/ (so nothing is written into the repository) with the README's names in place:
    the base folder, the ShareGPT file, the draft config, and 2 MT-bench questions."""
    root = tmp_path_factory.mktemp("checkout")
    shutil.copytree(REPO / "seed", root / "seed")
    s = root / "seed"
    for link in (s / "vicuna-7b-v1.3", s / "ge_data/vicuna-7b-v1.3", s / "evaluation/MT-bench/vicuna-7b-v1.3"):
        link.symlink_to(tiny_model_dir)
    (s / "evaluation/MT-bench/checkpoint_7b_vicuna").symlink_to(s / "checkpoint_7b_vicuna")
    (s / "train_data_vicuna7b").mkdir()  # the data step writes ge_data/..., training reads it from seed/
    (s / "ge_data/train_data_vicuna7b").symlink_to(s / "train_data_vicuna7b")
    records = json.loads((DATA / "sharegpt_sample_head12.json").read_text())[:4]
    (s / "ge_data/ShareGPT_V4.3_unfiltered_cleaned_split.json").write_text(json.dumps(records))
    (s / "train/vicuna_7B_config.json").write_text(json.dumps(llama_draft_config(tiny_model_dir), indent=2))
    questions = (DATA / "mt_bench_question.jsonl").read_text().splitlines()[:2]
    (s / "evaluation/MT-bench/data").mkdir(parents=True, exist_ok=True)  # the questions are not shipped
    (s / "evaluation/MT-bench/data/question.jsonl").write_text("\n".join(questions) + "\n")
    return root


def typed(checkout: Path, block: tuple[str, str]) -> subprocess.CompletedProcess:
    """Run a README block with bash from its folder, as a user would (the venv's python and accelerate)."""
    folder, text = block
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(["bash", "-c", text], cwd=checkout / folder, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def data_dir(checkout):
    typed(checkout, DATA_STEP)
    return checkout / "seed/train_data_vicuna7b"


@pytest.fixture(scope="module")
def trained(checkout, data_dir):
    typed(checkout, TRAIN)
    ckpt = checkout / "seed/checkpoint_7b_vicuna"
    return ckpt, load_file(str(ckpt / "model.safetensors"))


def test_data_step_writes_what_distill_writes(data_dir, tiny_model_dir, checkout, tmp_path):
    ours = tmp_path / "ours"
    assert main(["distill", "--base-model", str(tiny_model_dir), "--out", str(ours), "--data",
                 str(checkout / "seed/ge_data/ShareGPT_V4.3_unfiltered_cleaned_split.json"),
                 "--mode", "teacher-forced", "--save-hidden", "--template", "vicuna"]) == 0
    m = json.loads((data_dir / "manifest.json").read_text())
    assert m["complete"] and m["mode"] == "teacher-forced" and m["stats"]["sequences"] == 4
    names = sorted(p.name for p in data_dir.glob("shard_*.safetensors"))
    assert names == sorted(p.name for p in ours.glob("shard_*.safetensors"))
    for n in names:
        a, b = load_file(str(data_dir / n)), load_file(str(ours / n))
        assert "hidden" in " ".join(a) and a.keys() == b.keys()  # the seed stored hidden states: so do we
        assert all(torch.equal(a[k], b[k]) for k in a), n


def test_training_numbers_states_as_the_seed_and_loads(trained):
    ckpt, _ = trained
    assert sorted(int(p.name[6:]) for p in ckpt.glob("state_*")) == list(range(LAST_EPOCH + 1))
    assert sorted(int(p.name[6:]) for p in ckpt.glob("epoch_*")) == list(range(LAST_EPOCH + 1))
    epochs = [r["epoch"] for r in map(json.loads, (ckpt / "log.jsonl").read_text().splitlines()) if r["event"] == "epoch"]
    assert epochs == list(range(LAST_EPOCH + 1))
    args = json.loads((ckpt / "train_args.json").read_text())
    assert (args["preset"], args["layout"], args["label_len"], args["ctc_weight"], args["lr"], args["bs"]) == (
        "reference", "eagle1", 3, 0.01, 3e-5, 1)  # the seed's training is the reference recipe
    assert (args["clip"], args["grad_clip"], args["lr_schedule"], args["warmup"]) == ("value", 0.5, "linear", 2000)
    assert args["mixed_precision"] == "bf16"  # accelerate launch --mixed_precision=bf16
    cfg = DraftConfig.load(ckpt)
    assert (cfg.architecture, cfg.layout, cfg.num_context_layers, cfg.label_len) == ("ar", "eagle1", 1, 3)
    assert json.loads((ckpt / "state_2/trainer_state.json").read_text())["epoch"] == 2


def test_recover_n_continues_from_state_n_to_the_same_draft(trained, checkout):
    ckpt, first = trained
    r = typed(checkout, RECOVER)
    assert "--recover 2" in r.stderr
    lines = [json.loads(x) for x in (ckpt / "log.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines if x["event"] == "epoch"] == list(range(LAST_EPOCH + 1))
    again = load_file(str(ckpt / "model.safetensors"))
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)  # as if uninterrupted


def test_evaluation_scripts_write_the_seeds_answer_files(trained, checkout):
    out = checkout / "seed/evaluation/MT-bench/data/model_answer"
    r = typed(checkout, EVAL)
    assert "vc_7b--tree-choices" in r.stderr  # the README's joined line, read back as two arguments
    typed(checkout, EVAL_BASELINE)
    spec = [json.loads(x) for x in (out / "vc_7b-temperature-1.0.jsonl").read_text().splitlines()]
    base = [json.loads(x) for x in (out / "vc_7b_baseline-temperature-1.0.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in spec] == [a["question_id"] for a in base] == [81, 82]
    assert {a["model_id"] for a in spec} == {"vc_7b-temperature-1.0"}
    for s, b in zip(spec, base):
        assert len(s["choices"][0]["turns"]) == 2
        assert s["meta"]["proposer"] == "ctc" and s["meta"]["generator"] == "medusa" and s["meta"]["temperature"] == 0
        assert Path(s["meta"]["draft_model"]).name == "checkpoint_7b_vicuna"
        assert not b["meta"]["speculative"]
        assert s["choices"][0]["tokens"] == b["choices"][0]["tokens"]  # lossless: the base's own greedy answers


# --------------------------------------------------------------------------- the mappings, without models

@pytest.mark.parametrize("spec, ours", [("[[0],[1],[2],[3]]", "0;1;2;3"), ("[[0,1],[2,3]]", "0,1;2,3"),
                                        ([[4], [5], [6], [7]], "4;5;6;7"), (" [[0, 1]] ", "0,1")])
def test_gpu_map_becomes_our_gpu_groups(spec, ours):
    assert seed.gpu_groups(spec) == ours


@pytest.mark.parametrize("spec", ["[[0],[]]", "[0,1]", "[[-1]]", "[[0.5]]", "[[True]]", "gpu0", "[]", [[0], "1"]])
def test_bad_gpu_maps_are_refused(spec):
    with pytest.raises(CTCDrafterError, match="list of GPU groups"):
        seed.gpu_groups(spec)


def captured(monkeypatch) -> list:
    calls = []
    monkeypatch.setattr(seed, "_run", lambda argv: calls.append(argv) or 0)
    return calls


def test_gpu_map_runs_a_worker_per_group(monkeypatch):
    calls = captured(monkeypatch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # restored afterwards: the data step drops it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    argv = ["--outdir", "out", "--type", "llama2chat", "--basemodel", "b", "--data", "d.json"]
    assert seed.data_step(argv, [[0, 1], [2, 3]]) == 0
    assert seed.data_step(argv + ["--gpus", "[[0],[1],[2],[3]]"], [[0, 1], [2, 3]]) == 0  # the option wins
    assert seed.data_step(argv, None) == 0
    got = [c[c.index("--gpus") + 1] if "--gpus" in c else None for c in calls]
    assert got == ["0,1;2,3", "0;1;2;3", None]
    assert calls[0][calls[0].index("--template") + 1] == "llama2chat"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has GPUs")
def test_gpu_map_without_gpus_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    code = seed.data_step(["--outdir", "out", "--basemodel", "b", "--data", "d.json"], [[0], [1], [2], [3]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "this machine has none" in err[0] and "gpus = None" in err[0]


def test_physical_gpu_numbers_drop_the_exported_list(monkeypatch, capsys):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    seed.physical_gpu_numbers()
    assert "CUDA_VISIBLE_DEVICES" not in os.environ and "the machine's" in capsys.readouterr().err


# Base configs (dims only) for the seed's train/*.json
BASES = {"vicuna_7B": (4096, 11008, 32, 32), "vicuna_13B": (5120, 13824, 40, 40), "vicuna_33B": (6656, 17920, 52, 52),
         "llama_2_chat_7B": (4096, 11008, 32, 32), "llama_2_chat_13B": (5120, 13824, 40, 40),
         "llama_2_chat_70B": (8192, 28672, 64, 8)}


@pytest.mark.parametrize("name", sorted(BASES))
def test_the_seeds_draft_configs_shape_our_draft(name):
    from transformers import LlamaConfig

    hidden, inter, heads, kv = BASES[name]
    base = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv,
                       vocab_size=32000, num_hidden_layers=32)
    seed_cfg = json.loads((REPO / f"seed/train/{name}_config.json").read_text())
    cfg = DraftConfig.from_base_config(base, architecture="ar", **seed.draft_config_from_llama(
        REPO / f"seed/train/{name}_config.json"))
    assert cfg.num_context_layers == seed_cfg["num_hidden_layers"] == 1
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads) == (hidden, inter, heads)
    assert cfg.num_key_value_heads == seed_cfg.get("num_key_value_heads", heads)  # vicuna_33B's draft: 13 of 52
    assert cfg.head_dim == hidden // heads and cfg.rms_norm_eps == seed_cfg["rms_norm_eps"]


def test_a_config_for_another_base_is_one_line(checkout, data_dir, capsys):
    s = checkout / "seed"
    code = seed.train_step(["--tmpdir", str(data_dir), "--cpdir", str(checkout / "other"), "--basepath",
                            str(s / "vicuna-7b-v1.3"), "--configpath", str(REPO / "seed/train/vicuna_7B_config.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "hidden_size 4096" in err[-1] and "another base" in err[-1]
    assert not (checkout / "other").exists() or not list((checkout / "other").glob("state_*"))


def test_training_options_map_onto_ours(monkeypatch, tmp_path):
    calls = captured(monkeypatch)
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 1}))
    assert seed.train_step(["--tmpdir", "d", "--cpdir", "c", "--basepath", "b", "--configpath", str(cfg), "--bs", "2",
                            "--recover", "2", "--cw", "0.001", "--fixlen", "4", "--outdir", "ignored"]) == 0
    a = calls[0]
    opt = {a[i]: a[i + 1] for i in range(1, len(a) - 1) if a[i].startswith("--")}
    assert a[0] == "train" and opt["--data"] == "d" and opt["--out"] == "c" and opt["--base-model"] == "b"
    assert (opt["--recover"], opt["--first-epoch"], opt["--epochs"]) == ("2", "0", "20")
    assert (opt["--ctc-weight"], opt["--label-len"], opt["--bs"], opt["--preset"]) == ("0.001", "4", "2", "reference")
    assert json.loads(opt["--config"])["num_context_layers"] == 1


@pytest.mark.parametrize("argv, needle", [(["--gradient-accumulation-steps", "4"], "does not accumulate"),
                                          (["--recover", "-3"], "-1 to start afresh"),
                                          (["--bs", "x"], "invalid int value")])
def test_training_refusals_are_one_line(argv, needle, tmp_path, capsys):
    code = seed.train_step(["--configpath", str(REPO / "seed/train/vicuna_7B_config.json"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0]


def test_recover_counts_from_the_first_epoch(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--first-epoch", "1", "--recover", "0"])
    assert code == 2 and "--recover takes an epoch number >= 1" in capsys.readouterr().err


def test_rejoin_splits_a_value_that_swallowed_an_option():
    opts = {"--model-id", "--tree-choices", "--bench-name"}
    assert seed.rejoin_split_values(["--model-id", "vc_7b--tree-choices", "medusa"], opts) == \
        ["--model-id", "vc_7b", "--tree-choices", "medusa"]
    kept = ["--model-id", "vc--7b", "--x", "a--unknown", "--tree-choices", "medusa"]
    assert seed.rejoin_split_values(kept, opts) == kept


def test_a_state_folder_means_that_epochs_draft(tmp_path):
    (tmp_path / "state_20").mkdir()
    (tmp_path / "epoch_20").mkdir()
    (tmp_path / "epoch_20/config.json").write_text("{}")
    assert seed.draft_folder(str(tmp_path / "state_20")) == str(tmp_path / "epoch_20")
    assert seed.draft_folder(str(tmp_path)) == str(tmp_path)


SCRIPTS = [(bench, folder, t, b) for bench, folder in (("mt_bench", "MT-bench"), ("gsm8k", "GSM8K"))
           for t in seed.SEED_TYPES for b in (False, True)]


@pytest.mark.parametrize("bench, folder, template, baseline", SCRIPTS)
def test_every_evaluation_script_maps_to_its_bench_and_template(bench, folder, template, baseline, monkeypatch,
                                                                 tmp_path, tiny_model_dir):
    calls = captured(monkeypatch)
    (tmp_path / "data").mkdir()
    (tmp_path / "data/question.jsonl").write_text("")
    monkeypatch.chdir(tmp_path)
    script = REPO / f"seed/evaluation/{folder}/scripts/{template}{'_baseline' if baseline else ''}.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--draft-model-path", "ck/state_3", "--base-model-path",
                                      str(tiny_model_dir), "--model-id", "m", "--tree-choices", "medusa",
                                      "--use-safetensor-weight", "True", "--temperature", "0.7"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(script), run_name="__main__")
    assert e.value.code == 0
    a = calls[0]
    opt = {a[i]: a[i + 1] for i in range(1, len(a) - 1) if a[i].startswith("--") and not a[i + 1].startswith("--")}
    assert (opt["--bench"], opt["--template"], opt["--temperature"]) == (bench, template, "0")
    assert opt["--model-id"] == "m-temperature-0.7" and opt["--answer-file"] == "data/model_answer/m-temperature-0.7.jsonl"
    assert ("--baseline" in a) == baseline and ("--draft-model" in a) != baseline
    assert int(opt["--max-new-tokens"]) == 1024  # the seed's default, within the tiny base's 1024-token context


def test_evaluation_without_question_file_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = seed.eval_step(["--base-model-path", "b"], "gsm8k", "vicuna", False)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "data/question.jsonl not found" in err[0] and "grade-school-math" in err[0]


def test_help_says_which_seed_options_do_nothing_here():
    text = " ".join(seed.eval_parser("vicuna.py").format_help().split())
    for opt in ("--use-safetensor-weight", "--load-in-8bit", "--max-gpu-memory", "--bench-name", "--temperature"):
        assert opt in text
    assert "accepted, unused" in text and "greedy" in text
    assert "accepted, unused" in " ".join(seed.train_parser().format_help().split())
