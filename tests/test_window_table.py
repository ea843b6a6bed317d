"""scripts/window_table.py: tokens/s per window are sums of tokens over sums of time, only over questions
every method answered, across several answer folders (a run's --part processes)."""

import json
import sys
from pathlib import Path

import pytest
from conftest import load_script


def _load():
    return load_script("window_table")


def _answers(path: Path, rows):  # rows: (question_id, [tokens per turn], [seconds per turn])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"question_id": q, "choices": [{"turns": ["x"] * len(t), "new_tokens": t,
                                                                        "wall_time": w}]}) + "\n"
                            for q, t, w in rows))


def _table(capsys, monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", ["window_table.py"] + argv)
    _load().main()
    lines = capsys.readouterr().out.splitlines()
    return {l.split("|")[1].strip(): [c.strip() for c in l.split("|")[2:-1]] for l in lines[2:]}


def test_rates_are_pooled_per_window_over_common_questions(tmp_path, capsys, monkeypatch):
    # two parts; question 3 only answered by "a": left out of every row
    _answers(tmp_path / "p1" / "a.jsonl", [(0, [10, 10], [1.0, 1.0]), (1, [30], [1.0]), (3, [5], [1.0])])
    _answers(tmp_path / "p2" / "a.jsonl", [(2, [40], [2.0])])
    _answers(tmp_path / "p1" / "b.jsonl", [(0, [20], [4.0]), (1, [20], [1.0])])
    _answers(tmp_path / "p2" / "b.jsonl", [(2, [40], [4.0])])
    rows = _table(capsys, monkeypatch, [str(tmp_path / "p1"), str(tmp_path / "p2"), "--methods", "a,b",
                                        "--window", "2", "--ratio", "a/b", "--span", "1-2"])
    assert rows["0-1"] == ["16.67", "8.00", "2.083"]  # a: 50 tokens / 3 s; b: 40 / 5
    assert rows["2-2"] == ["20.00", "10.00", "2.000"]
    assert rows["**1-2**"] == ["23.33", "12.00", "1.944"]
    assert rows["**all 3**"] == ["18.00", "8.89", "2.025"]  # 90 / 5 and 80 / 9


def test_a_method_without_answers_is_a_clear_error(tmp_path, capsys, monkeypatch):
    _answers(tmp_path / "a.jsonl", [(0, [1], [1.0])])
    monkeypatch.setattr(sys, "argv", ["window_table.py", str(tmp_path), "--methods", "a,missing"])
    with pytest.raises(SystemExit) as e:
        _load().main()
    assert e.value.code == 2 and "no answers for missing" in capsys.readouterr().err
