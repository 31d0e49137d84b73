"""benchmarks/bench_table.py: the per-seed table of a finished bench, from its results.json."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_table  # noqa: E402


def _results():
    return {"command": "sfdaseg bench x", "results": {
        "source-only": {"test_mean": 40.0, "val_mean": 30.0, "runs": [{"test": 40.0, "val": 30.0}]},
        "oracle": {"test_mean": 50.0, "val_mean": 45.0, "runs": [{"test": 50.0, "val": 45.0}]},
        "a": {"seeds": [0, 1], "runs": [{"test": 44.0, "val": 33.0}, {"test": 46.0, "val": 35.0}],
              "guard": [{"rolled_back": False}, {"rolled_back": False}], "test_mean": 45.0, "test_std": 2 ** 0.5,
              "val_mean": 34.0, "gap_closure": 0.5, "below_source": 0, "rolled_back": 0},
        "b": {"seeds": [0, 1], "runs": [{"test": 39.0}, {"test": 41.0}],
              "guard": [{"rolled_back": True, "delivered_step": 80}, {"rolled_back": False}], "test_mean": 40.0,
              "test_std": 2 ** 0.5, "val_mean": None, "gap_closure": 0.0, "below_source": 1, "rolled_back": 1},
    }}


def test_rows_have_per_seed_values_closure_and_rollbacks():
    src, orc, rows = bench_table.rows(_results()["results"])
    a, b = rows
    assert (src, orc) == (40.0, 50.0)
    assert a["test"] == [44.0, 46.0] and a["test_mean"] == 45.0 and abs(a["test_std"] - 2 ** 0.5) < 1e-9
    assert a["closure"] == 0.5 and a["below"] == 0 and a["rolled_back"] == []
    assert b["below"] == 1 and b["rolled_back"] == [80] and b["val_mean"] is None  # a bench without val
    table = bench_table.markdown(_results()["results"])
    assert "| `a` | 2 | 45.0 +- 1.4 | 44.0 / 46.0 | 50% | 0/2 | 0/2 | 34.0 |" in table
    assert "| `b` | 2 | 40.0 +- 1.4 | 39.0 / 41.0 | 0% | 1/2 | 1/2 (step 80) | - |" in table


def test_a_folder_without_results_is_a_one_line_error(tmp_path, capsys):
    assert bench_table.main([str(tmp_path)]) == 2
    assert "results.json" in capsys.readouterr().err
    (tmp_path / "results.json").write_text(json.dumps(_results()))
    assert bench_table.main([str(tmp_path)]) == 0
    assert "sfdaseg bench x" in capsys.readouterr().out
