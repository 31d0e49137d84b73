"""Benchmark scripts run end to end at smoke-test size (no timing or accuracy asserts: those are measured)."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_adapt_synthetic_quick(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the script reads configs/ relative to the repository
    bench = load("adapt_synthetic")
    assert bench.main(["--out", str(tmp_path / "b"), "--quick", "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "| source-only |" in table and "| diga_sf |" in table and "Reproduce:" in table
    data = json.loads((tmp_path / "b" / "results.json").read_text())["results"]
    assert set(bench.VARIANTS) | set(bench.ABLATIONS) | {"source-only", "oracle"} == set(data)
    for r in data.values():
        assert 0.0 <= r["target_mean"] <= 100.0 and 0.0 <= r["shift_mean"] <= 100.0
