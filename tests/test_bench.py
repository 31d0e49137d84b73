"""``sfdaseg bench`` end to end at smoke-test size (no accuracy asserts: those are measured, see the README)."""

import json
import math
from pathlib import Path

import pytest

from sfdaseg.cli import main
from sfdaseg.config import BenchConfig, load_config
from sfdaseg.runs.bench import ABLATIONS, _rows, signal_ranking, slug

ROOT = Path(__file__).resolve().parents[1]


def quick_args(out):
    return ["bench", "--recipes", "selftrain,diga_sf", "--seeds", "2", "--out", str(out),
            "--device", "cpu", "source_iters=6", "adapt_iters=2", "snapshots=2", "val_length=8",
            "synthetic={size: [32, 64], length: 16}", "overrides=[data.num_workers=0, data.batch_size=2]",
            "recipe_overrides={diga_sf: [method.proto_init_images=4]}",
            "variants={'selftrain lr 1e-4': [selftrain, optim.lr=1e-4]}"]


def test_bench_runs_every_row_resumes_and_ranks_signals(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the per-recipe base configs live in configs/adapt/
    out = tmp_path / "b"
    assert main(quick_args(out)) == 0
    table = (out / "results.md").read_text()
    data = json.loads((out / "results.json").read_text())
    assert set(data["results"]) == {"source-only", "oracle", "selftrain", "diga_sf", "selftrain lr 1e-4"}
    for name, r in data["results"].items():
        assert f"| {name} |" in table
        assert 0.0 <= r["test_mean"] <= 100.0 and 0.0 <= r["val_mean"] <= 100.0 and 0.0 <= r["extra_mean"]["synthetic:shift:val"] <= 100.0
        assert len(r["runs"]) == (2 if name in ("selftrain", "diga_sf") else 1)
    assert data["results"]["selftrain"]["gap_closure"] is not None
    assert "sfdaseg bench --recipes selftrain,diga_sf" in table  # how to reproduce it
    # Every run measured its checkpoints at steps 0, 1, 2 without labels; bench scored them afterwards.
    points = data["signal_points"]
    assert len(points) == 2 + 2 + 1 and all([p["step"] for p in run] == [0, 1, 2] for run in points)
    assert set(data["signal_ranking"]) == {"entropy", "kept_frac", "hist_drift", "snd", "classes_present"}
    assert "Label-free signals vs true test mIoU" in table

    # A second call reuses every finished run (nothing is retrained) and gives the same table.
    stamp = (out / "selftrain" / "seed0" / "model.ckpt").stat().st_mtime_ns
    assert main(quick_args(out)) == 0
    assert (out / "selftrain" / "seed0" / "model.ckpt").stat().st_mtime_ns == stamp
    assert json.loads((out / "results.json").read_text())["results"]["selftrain"]["runs"] == \
        data["results"]["selftrain"]["runs"]


def test_ablation_rows_come_from_the_table():
    cfg = load_config(BenchConfig, overrides=["recipes=[selftrain, stvm]", "ablations=true", "ablation_seeds=2"])
    rows = _rows(cfg)
    assert [r[0] for r in rows] == ["selftrain", "stvm"] + [f"{r}, {label}" for r in ("selftrain", "stvm")
                                                           for label, _ in ABLATIONS[r]]
    assert all(r[3] == 2 for r in rows[2:]) and rows[2][2] == ABLATIONS["selftrain"][0][1]


def test_signal_ranking_orients_signals_and_reports_picks():
    runs = [[{"miou": 30 + i, "snd": 1.0 + i, "entropy": 1.0 - 0.1 * i, "kept_frac": 0.5, "hist_drift": 0.1 * i,
              "classes_present": 5} for i in range(4)] for _ in range(2)]
    r = signal_ranking(runs)
    assert r["snd"]["within_run"] == pytest.approx(1.0) and r["entropy"]["within_run"] == pytest.approx(1.0)
    assert r["hist_drift"]["within_run"] == pytest.approx(-1.0)
    assert math.isnan(r["kept_frac"]["within_run"])  # a constant signal ranks nothing
    assert r["snd"]["picked_miou"] == 33 and r["snd"]["final_miou"] == 33 and r["snd"]["best_miou"] == 33


def test_unknown_recipe_is_refused(capsys):
    assert main(["bench", "--recipes", "selftrian"]) == 2
    assert "selftrian" in capsys.readouterr().err


def test_slug_is_a_plain_folder_name():
    assert slug("selftrain, class-balanced 50% (x=1)") == "selftrain__class-balanced_50pct_x-1"


def test_cached_scores_are_reused_only_for_the_same_split_and_checkpoint(tmp_path):
    """A tuning bench scores target:val under the name "test"; a later bench on target:test must not reuse it."""
    import torch

    from sfdaseg.data.classes import CITYSCAPES19
    from sfdaseg.models import build_model, save_model
    from sfdaseg.runs.bench import Scorer

    torch.manual_seed(0)
    ckpt = save_model(tmp_path / "m.ckpt", build_model("tiny", num_classes=19, width=8), classes=CITYSCAPES19)
    common = ["val=null", "val_extra=[]", "val_length=4", "synthetic={size: [32, 64]}"]

    def scorer(test):
        return Scorer(load_config(BenchConfig, overrides=[f"test={test}", *common]), torch.device("cpu"))

    on_val = scorer("synthetic:target:val")(ckpt)["test"]
    on_test = scorer("synthetic:target:test")(ckpt)["test"]
    (tmp_path / "m.scores.json").unlink()
    fresh = scorer("synthetic:target:test")(ckpt)["test"]
    assert on_test == pytest.approx(fresh) and on_val != pytest.approx(fresh)
    # Same split, same checkpoint: read from the cache (a changed score on disk proves it was read).
    data = json.loads((tmp_path / "m.scores.json").read_text())
    data["test"] = -1.0
    (tmp_path / "m.scores.json").write_text(json.dumps(data))
    assert scorer("synthetic:target:test")(ckpt)["test"] == -1.0
    # A replaced checkpoint is scored again.
    torch.manual_seed(1)
    save_model(ckpt, build_model("tiny", num_classes=19, width=8), classes=CITYSCAPES19)
    assert scorer("synthetic:target:test")(ckpt)["test"] >= 0.0
