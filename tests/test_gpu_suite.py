"""The GPU suite's dry run: the same code as on the GPU machine, on the CPU at a tiny size (no timing asserts)."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_dry_run_writes_every_part(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_suite
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert gpu_suite.main(["--out", str(tmp_path), "--dry-run"]) == 0
    parts = json.loads((tmp_path / "suite.json").read_text())
    assert list(parts) == ["env", "peak", "step_tiny", "profile", "mc_dropout", "eval", "switch_tiny"]
    assert all(p["status"] == "ok" for p in parts.values()), {k: p["status"] for k, p in parts.items()}
    rows = parts["step_tiny"]["rows"]
    assert {r["recipe"] for r in rows} == {"selftrain", "stvm"} and all(r["bare_ms"] > 0 for r in rows)
    assert parts["profile"]["top"] and 0 < parts["profile"]["busy_frac"]
    assert all(r["rc"] == 0 and r["images_per_s"] > 0 for r in parts["eval"]["rows"].values())
    summary = (tmp_path / "summary.md").read_text()
    assert "## Goals" in summary and "overhead" in summary and "## Profile" in summary
    # The budget: every part the GPU run plans has a planned time, and they fit in 8 minutes.
    assert sum(gpu_suite.BUDGET_S.values()) <= 8 * 60
