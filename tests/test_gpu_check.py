"""scripts/gpu_check.py: its CPU dry run completes and reports every number the GPU run will report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
BUDGETS = [16, 32, 64, 128]


@pytest.mark.slow  # the whole script in a subprocess (~45 s)
def test_dry_run_writes_every_expected_number(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)], capture_output=True,
                       text=True, env=env, timeout=180)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads((tmp_path / "gpu_check.json").read_text())
    for key in ("env", "config", "imports", "peak_bandwidth", "exactness_fp32", "agreement", "timing", "targets",
                "summary", "section_s"):
        assert key in r and "error" not in r[key], key
    assert r["imports"]["ok"] and r["imports"]["modules"] > 10  # every module imports without gguf
    assert r["peak_bandwidth"]["gbps"] > 0
    # On the CPU in fp32 the comparison is exact, as in tests/test_exactness.py.
    assert r["exactness_fp32"]["all_equal"] and r["exactness_fp32"]["runs"] >= 6
    for dn in ("fp16", "bf16"):
        a = r["agreement"][dn]
        assert 0 <= a["run_agreement"] <= 1 and 0 <= a["token_agreement"] <= 1 and a["runs"] > 0
        assert len(a["margins_at_divergence"]) == a["runs"] - a["identical_runs"]
    assert set(r["timing"]) == {"7b", "13b"}
    for name, t in r["timing"].items():
        assert t["hf"]["step_ms"] > 0 and t["vanilla"]["step_ms"] > 0 and t["hf"]["steps_timed"] >= 3
        assert set(t["spec"]) == {f"{k}{b}" for k in ("beam", "fixed") for b in BUDGETS}
        for b in BUDGETS:
            fixed, beam = t["spec"][f"fixed{b}"], t["spec"][f"beam{b}"]
            assert fixed["nodes_min"] == fixed["nodes_max"] == b  # the synthetic tree has exactly b nodes
            assert 1 < beam["nodes_max"] <= b
            assert fixed["verify_only_ms"] > 0 and beam["step_with_extend_ms"] > 0
        do = t["draft_overhead"]
        assert do["total_ms"] > 0 and do["fraction_of_hf_step"] > 0
        for key in ("tokens_per_s", "weight_gbps", "fraction_of_peak", "syncs_per_step", "compact_kv_noncontiguous_ms",
                    "break_even_accept_length_beam64", "weight_bytes"):
            assert key in t, (name, key)
        for target in ("spec64_over_hf", "vanilla_over_hf", "draft_overhead"):
            assert isinstance(r["targets"][name][target]["pass"], bool)
    assert "targets 13b" in p.stdout.strip().splitlines()[-2]  # the table is printed last

