"""scripts/paired_ratio.py: two methods' beta (or tokens/s) pooled over the questions both answered, with a
bootstrap interval over questions that holds the whole-bench ratio."""

import json
import sys
from pathlib import Path

import pytest
from conftest import load_script


def _answers(path: Path, rows):  # rows: (question_id, [accepted lengths per step, per turn], [seconds per turn])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"question_id": q, "choices": [{
        "turns": ["x"] * len(acc), "accept_lengths": acc, "new_tokens": [sum(t) for t in acc], "wall_time": w}]}) + "\n"
        for q, acc, w in rows))


def _table(capsys, monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", ["paired_ratio.py"] + argv)
    load_script("paired_ratio").main()
    lines = capsys.readouterr().out.splitlines()
    return {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:-1]] for l in lines[2:]}


def test_ratio_pools_tokens_over_steps_on_common_questions(tmp_path, capsys, monkeypatch):
    # a: q0 12 tokens / 6 steps, q1 8 / 2; b: q0 12 / 12, q1 8 / 8; q2 only answered by a: left out
    _answers(tmp_path / "p1" / "a.jsonl", [(0, [[2, 2, 2], [2, 2, 2]], [1.0, 1.0]), (2, [[5]], [1.0])])
    _answers(tmp_path / "p2" / "a.jsonl", [(1, [[4, 4]], [1.0])])
    _answers(tmp_path / "p1" / "b.jsonl", [(0, [[1] * 6, [1] * 6], [2.0, 2.0]), (1, [[1] * 8], [4.0])])
    dirs = [str(tmp_path / "p1"), str(tmp_path / "p2")]
    rows = _table(capsys, monkeypatch, dirs + ["--pair", "a/b", "--pair", "b/b"])
    n, r, ci = rows["a/b"]
    assert (n, r) == ("2", "2.500")  # (20 / 8) / (20 / 20)
    lo, hi = (float(x) for x in ci.split("-"))
    assert lo <= 2.5 <= hi and lo >= 2.0 and hi <= 4.0  # resampled ratios: q0 alone 2.0, q1 alone 4.0
    assert rows["b/b"] == ["2", "1.000", "1.000-1.000"]
    rows = _table(capsys, monkeypatch, dirs + ["--pair", "a/b", "--metric", "tokens_per_s"])
    assert rows["a/b"][1] == "2.667"  # (20 tokens / 3 s) / (20 / 8 s)


def test_unknown_method_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    _answers(tmp_path / "a.jsonl", [(0, [[1]], [1.0])])
    monkeypatch.setattr(sys, "argv", ["paired_ratio.py", str(tmp_path), "--pair", "a/zzz"])
    with pytest.raises(SystemExit) as e:
        load_script("paired_ratio").main()
    assert e.value.code == 2 and "no answers of 'zzz'" in capsys.readouterr().err
