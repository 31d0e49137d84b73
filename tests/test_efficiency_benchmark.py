"""The efficiency benchmark's whole path (sources, UniSFDA pipeline, DUDA, scoring, cost, payoff) at a tiny size."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_efficiency_benchmark_runs_end_to_end_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("SFDASEG_CACHE", str(tmp_path / "cache"))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import efficiency_synthetic as eff
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    args = ["--out", str(tmp_path / "eff"), "--seeds", "0", "--aux-widths", "8", "4", "--deployed-width", "4",
            "--source-iters", "3", "--override", "train.iters=3", "--override",
            "data.synthetic={size: [32, 64], length: 8}", "--override", "data.batch_size=2", "--override",
            "data.crop=[32,64]", "--override", "data.num_workers=0", "--val-length", "2", "--repeats", "1"]
    assert eff.main(args) == 0
    res = json.loads((tmp_path / "eff" / "results.json").read_text())
    names = set(res["rows"])
    assert {"source, width 8", "source, width 4", "UniSFDA stage 1, width 8", "UniSFDA stage 1, width 4",
            "UniSFDA ensemble (stage 1 fused)", "UniSFDA final (stage 2), width 4", "DUDA large teacher, width 8",
            "DUDA small student, width 4"} == names
    assert all(len(r["test"]) == 1 and 0.0 <= r["test"][0] <= 100.0 for r in res["rows"].values())
    assert set(res["final_minus_stage1"]) == {"8", "4"} and len(res["duda_keep"]) == 1
    before = (tmp_path / "eff" / "seed0" / "duda" / "model.ckpt").stat().st_mtime_ns
    assert eff.main(args) == 0  # a rerun reuses every finished run and only scores
    assert (tmp_path / "eff" / "seed0" / "duda" / "model.ckpt").stat().st_mtime_ns == before
    assert "UniSFDA: does the final model beat" in (tmp_path / "eff" / "results.md").read_text()
    # UniSFDA alone (DUDA's gain kept is measured on the bench runs too): no DUDA row, no DUDA payoff.
    assert eff.main([*args, "--methods", "unisfda"]) == 0
    res = json.loads((tmp_path / "eff" / "results.json").read_text())
    assert not any(n.startswith("DUDA") for n in res["rows"]) and res["duda_keep"] == []
    table = (tmp_path / "eff" / "results.md").read_text()
    assert "## DUDA" not in table and "UniSFDA: does the final model beat" in table
    assert "--methods unisfda" in table  # the command that reproduces it
