"""CLI: `generate --json` with and without --baseline, and one-line errors for bad input."""

import json
import subprocess
import sys

import pytest
import torch

from ctc_drafter.cli.main import main
from ctc_drafter.draft import CTCDraftModel, DraftConfig


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_json_speculative_and_baseline(capsys, tiny_model_dir):
    common = ["generate", "--base-model", str(tiny_model_dir), "--prompt", "Say hello.", "--max-new-tokens", "12", "--json"]
    code, out, err = run_cli(capsys, *common, "--draft-model", "untrained")
    assert code == 0
    spec = json.loads(out)
    for key in ("text", "new_tokens", "steps", "mean_accept_length", "tokens_per_s", "wall_s"):
        assert key in spec
    assert "UNTRAINED" in err and spec["draft_trained"] is False
    code, out, _ = run_cli(capsys, *common, "--baseline")
    base = json.loads(out)
    assert code == 0 and base["speculative"] is False and base["mean_accept_length"] == 1.0
    assert spec["text"] == base["text"] and spec["new_tokens"] == base["new_tokens"] == base["steps"]


@pytest.fixture
def other_draft(tmp_path):
    cfg = DraftConfig(hidden_size=32, vocab_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      intermediate_size=64, base_model="toy")
    d = tmp_path / "draft"
    CTCDraftModel(cfg).init_weights(0).save_pretrained(d)
    return d


@pytest.mark.parametrize("case", ["missing_base", "corrupt_base", "wrong_draft", "missing_draft", "empty_prompt",
                                  "negative_temperature", "long_prompt", "bad_budget"])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, tiny_model_dir, other_draft, case):
    base = ["--base-model", str(tiny_model_dir)]
    args = {
        "missing_base": ["--base-model", str(tmp_path / "nope"), "--prompt", "hi"],
        "corrupt_base": ["--base-model", str(_corrupt(tmp_path)), "--prompt", "hi"],
        "wrong_draft": base + ["--draft-model", str(other_draft), "--prompt", "hi"],
        "missing_draft": base + ["--draft-model", str(tmp_path / "nodraft"), "--prompt", "hi"],
        "empty_prompt": base + ["--draft-model", "untrained", "--prompt", "   "],
        "negative_temperature": base + ["--draft-model", "untrained", "--prompt", "hi", "--temperature", "-1"],
        "long_prompt": base + ["--draft-model", "untrained", "--prompt", "word " * 1100],
        "bad_budget": base + ["--draft-model", "untrained", "--prompt", "hi", "--budget", "0"],
    }[case]
    code, out, err = run_cli(capsys, "generate", *args)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("ctc-drafter: error:")]
    assert len(lines) == 1 and "Traceback" not in err
    expect = {"missing_base": "not found", "corrupt_base": "cannot load", "wrong_draft": "vocabulary size",
              "missing_draft": "not found", "empty_prompt": "empty prompt", "negative_temperature": "temperature",
              "long_prompt": "context", "bad_budget": "budget"}[case]
    assert expect in lines[0]


def _corrupt(tmp_path):
    d = tmp_path / "corrupt"
    d.mkdir()
    (d / "config.json").write_text("{not json")
    return d


def test_subprocess_error_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ctc_drafter", "generate", "--base-model", str(tmp_path / "x"),
                        "--prompt", "hi"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr


def test_draft_roundtrip_save_load(tmp_path, tiny_model_dir):
    from ctc_drafter.draft import load_draft, new_draft_for
    from ctc_drafter.models import load_base_model

    base = load_base_model(str(tiny_model_dir))
    d = new_draft_for(base, seed=3)
    d.save_pretrained(tmp_path / "d")
    d2, trained = load_draft(str(tmp_path / "d"), base)
    assert trained and d2.config == d.config
    for (k, a), (_, b) in zip(d.state_dict().items(), d2.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("closed_by_with", [False, True])
def test_interrupted_starts_a_line_of_its_own(capsys, monkeypatch, closed_by_with):
    """Ctrl-C inside a loop over a progress bar: the bar's line is ended before `ctc-drafter: interrupted`."""
    from tqdm.auto import tqdm

    import ctc_drafter.cli.report as report

    def interrupted_run(args):
        if closed_by_with:
            with tqdm(total=10, desc="working") as bar:
                bar.update(3)
                raise KeyboardInterrupt
        bar = tqdm(total=10, desc="working")  # updated by hand, as train's: the traceback keeps it open
        bar.update(3)
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "run", interrupted_run)
    assert main(["report", "a.jsonl", "--baseline", "b.jsonl"]) == 130
    err = capsys.readouterr().err
    lines = err.split("\n")  # (tqdm redraws with \r: a bar's line ends only at \n)
    assert lines[-1] == "" and lines[-2] == "ctc-drafter: interrupted", repr(err)
    assert "working" in lines[-3]
