"""The prepared GPU runs (scripts/gpu_*.sh) parse, what their device calls carry stays out of git (the
working tree that travels is capped), and the corpus run trains the shipped draft's recipe."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "scripts").glob("gpu_*.sh"))
RECIPE = ROOT / "ctc_drafter" / "assets" / "default_draft" / "train_args.json"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses(script):
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def carried_paths() -> set[str]:
    found = set()
    for s in SCRIPTS:
        for group in re.findall(r"carry=\[([^\]]*)\]", s.read_text()):
            found.update(re.findall(r'"([^"]+)"', group))
    return found


def test_carried_paths_are_git_ignored():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = carried_paths()
    assert {".gpu_assets/part1", ".gpu_assets/part2"} <= paths  # the two calls of gpu_corpus_train.sh
    for p in sorted(paths):
        r = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", "--no-index", p + "/x"])
        assert r.returncode == 0, f"{p} is carried to the device but not git-ignored"


def test_corpus_run_trains_the_shipped_recipe():
    text = (ROOT / "scripts" / "gpu_corpus_train.sh").read_text()
    train = text[text.index("-m ctc_drafter.train --base-model"):]
    train = train[: train.index("\nrc=")]  # the command itself, up to its exit status
    flags = dict(re.findall(r"--([a-z-]+) (\S+)", train.replace("\\\n", " ")))
    recipe = json.loads(RECIPE.read_text())
    assert flags["arch"] == recipe["arch"] and flags["positions"] == "all"
    for key in ("bs", "lr", "weight_decay", "warmup", "grad_clip", "ctc_weight", "label_len", "draft_vocab",
                "max_len", "seed", "eval_frac", "log_every"):
        assert float(flags[key.replace("_", "-")]) == float(recipe[key]), key
