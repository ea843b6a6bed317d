"""scripts/learning_curve.py: the `train` command of a variant, as `ctc-drafter train` parses it."""

import argparse
from pathlib import Path

from conftest import load_script

from ctc_drafter.cli.main import build_parser


def _args(tmp_path: Path, shared: list[str]) -> argparse.Namespace:
    return argparse.Namespace(out=str(tmp_path), base_model="default", epochs=2, train_args=shared)


def _parsed(cmd: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(cmd[cmd.index("train"):])


def test_a_capacity_variant_overrides_the_shared_options(tmp_path):
    lc = load_script("learning_curve")
    lc.VARIANTS["ctc-k6"] = ["--loss", "ctc", "--label-len", "6", "--draft-vocab", "16384"]
    a = _args(tmp_path, ["--bs", "4", "--label-len", "4", "--draft-vocab", "8192"])
    p = _parsed(lc.train_command(a, "ctc-k6", 1000, [tmp_path / "d1", tmp_path / "d2"]))
    assert (p.label_len, p.draft_vocab, p.loss, p.bs, p.epochs, p.seed) == (6, 16384, "ctc", 4, 2, 0)
    assert p.data == [str(tmp_path / "d1"), str(tmp_path / "d2")]
    # a variant that sets neither keeps the shared values
    p = _parsed(lc.train_command(a, "ar", 1000, [tmp_path / "d1"]))
    assert (p.label_len, p.draft_vocab, p.arch, p.ctc_weight) == (4, 8192, "ar", 0.0)
    assert p.recover is None


def test_an_interrupted_run_resumes_from_its_newest_state(tmp_path):
    lc = load_script("learning_curve")
    a = _args(tmp_path, [])
    for n in (2, 10, 9):
        (lc.ckpt_dir(a, "ce", 500) / f"state_{n}").mkdir(parents=True)
    p = _parsed(lc.train_command(a, "ce", 500, [tmp_path / "d"]))
    assert p.recover == 10 and p.out == str(lc.ckpt_dir(a, "ce", 500))


def test_variants_of_one_size_are_reported_as_a_capacity_comparison(tmp_path, monkeypatch):
    lc = load_script("learning_curve")
    monkeypatch.setattr("sys.argv", ["learning_curve.py", "--sizes", "500"])
    a = argparse.Namespace(out=str(tmp_path), prompts=8, max_new_tokens=96, budgets=[4, 64], losses=["ar", "ar-v16k"],
                           reference="default", reference_row={"beta": {"4": 1.9, "64": 2.3}})
    rows = [{"loss": "ar-v16k", "size": 500, "positions": 510, "beta": {"4": 1.41, "64": 1.78}},
            {"loss": "ar", "size": 500, "positions": 510, "beta": {"4": 1.42, "64": 1.77}}]
    lc.report(a, rows)
    table = (tmp_path / "curve.md").read_text().splitlines()
    assert "| ar | 500 | 510 | 1.420 | 1.770 |" in table and "| ar-v16k | 500 | 510 | 1.410 | 1.780 |" in table
    assert "| reference: default | | | 1.900 | 2.300 |" in table
    assert (tmp_path / "curve.png").stat().st_size > 1000
