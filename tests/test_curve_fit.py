"""scripts/curve_fit.py: the learning-curve table is read back, beta per doubling is fitted, and the
positions at which a trend reaches a target are where the line says."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
curve_fit = load_script("curve_fit")

# the layout learning_curve.py writes: a header line, the table (with a capacity row of one size and the
# reference row), then the command
TABLE = """Held-out beta (...) on the last 8 arena prompts; CPU: test; 2026-11-29.

| variant | subset size | positions in the subset | beta @ 4 nodes | beta @ 64 nodes |
|---|---|---|---|---|
| ar | 16000 | 16000 | 1.400 | 1.600 |
| ctc | 1000 | 1000 | 1.100 | 1.200 |
| ctc | 2000 | 2000 | 1.200 | 1.300 |
| ctc | 4000 | 4000 | 1.300 | 1.400 |
| ctc | 8000 | 8000 | 1.500 | 1.500 |
| reference: default | | | 1.700 | 2.000 |

Command:
"""


@pytest.fixture
def curve_md(tmp_path):
    p = tmp_path / "curve.md"
    p.write_text(TABLE)
    return p


def test_reads_every_row_of_the_table_but_the_reference(curve_md):
    curve = curve_fit.read_curve(curve_md)
    assert set(curve) == {"ar", "ctc"}
    assert curve["ctc"][4] == [(1000, 1.1), (2000, 1.2), (4000, 1.3), (8000, 1.5)]
    assert curve["ctc"][64][-1] == (8000, 1.5)


def test_fit_recovers_a_log_linear_curve_and_the_positions_for_a_target():
    pts = [(2 ** k, 1.0 + 0.1 * k) for k in range(10, 15)]  # +0.1 per doubling, 1.0 at 1 position
    a, s = curve_fit.fit(pts)
    assert s == pytest.approx(0.1) and a == pytest.approx(1.0)
    assert curve_fit.positions_for(2.0, a, s) == pytest.approx(2 ** 10)
    assert math.isinf(curve_fit.positions_for(2.0, 1.5, 0.0))  # a flat curve never gets there


def test_table_reports_fit_and_last_doubling_and_skips_capacity_rows(curve_md):
    lines = curve_fit.table(curve_fit.read_curve(curve_md), {4: 2.1})
    rows = lines[2:]
    assert [r.split("|")[1].strip() for r in rows] == ["ctc", "ctc"]  # `ar` has one size: not a curve
    at4 = rows[0].split("|")
    assert at4[6].strip() == "+0.200"  # last doubling: 1.3 -> 1.5
    # the last doubling's rate reaches 2.1 three doublings after 8000 positions
    assert at4[9].strip() == "64 k"


def test_cli_bad_target_and_missing_file_are_one_line_errors(curve_md, tmp_path):
    run = lambda *args: subprocess.run([sys.executable, str(ROOT / "scripts" / "curve_fit.py"), *args],  # noqa: E731
                                       capture_output=True, text=True)
    ok = run(str(curve_md), "--target", "4=2.0")
    assert ok.returncode == 0 and "| ctc | 4 |" in ok.stdout
    bad = run(str(curve_md), "--target", "four")
    assert bad.returncode != 0 and "NODES=BETA" in bad.stderr and "Traceback" not in bad.stderr
    missing = run(str(tmp_path / "nope.md"))
    assert missing.returncode != 0 and "no such file" in missing.stderr
    empty = tmp_path / "empty.md"
    empty.write_text("nothing here\n")
    none = run(str(empty))
    assert none.returncode != 0 and "no learning_curve.py table" in none.stderr
