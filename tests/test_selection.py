"""Target-only signals: SND, drift, the collapse alarm, rank correlation, and the monitor inside ``adapt``."""

import json
import math

import pytest
import torch
import torch.nn as nn

from sfdaseg.config import AdaptConfig, load_config
from sfdaseg.data.classes import CITYSCAPES19
from sfdaseg.models import load_model, save_model
from sfdaseg.models import build_model
from sfdaseg.runs.adapt import run_adapt
from sfdaseg.selection import (CollapseAlarm, class_hist_drift, prediction_signals, soft_neighborhood_density,
                               spearman)


def test_snd_of_identical_vectors_is_uniform_over_neighbours():
    probs = torch.full((10, 4), 0.25)
    assert soft_neighborhood_density(probs).item() == pytest.approx(math.log(9), rel=1e-5)


def test_snd_is_higher_for_dense_clusters_than_for_scattered_points():
    torch.manual_seed(0)
    centres = torch.eye(5)
    dense = torch.softmax(10 * centres.repeat_interleave(20, 0) + 0.01 * torch.randn(100, 5), 1)
    scattered = torch.softmax(3 * torch.randn(100, 5), 1)
    assert soft_neighborhood_density(dense) > soft_neighborhood_density(scattered)


def test_hist_drift_is_total_variation():
    assert class_hist_drift(torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0])) == pytest.approx(1.0)
    assert class_hist_drift(torch.tensor([2.0, 2.0]), torch.tensor([1.0, 1.0])) == pytest.approx(0.0)
    assert class_hist_drift(torch.tensor([3.0, 1.0]), torch.tensor([1.0, 1.0])) == pytest.approx(0.25)


def test_spearman_known_values_and_ties():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, rel=1e-6)
    assert math.isnan(spearman([1, 2], [1, 2])) and math.isnan(spearman([1, 1, 1], [1, 2, 3]))


class Constant(nn.Module):
    """Predicts fixed logits (1, C, 1, 1) everywhere."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits).view(1, -1, 1, 1))

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1, x.shape[2], x.shape[3])


def test_prediction_signals_of_a_known_model():
    images = [torch.zeros(2, 3, 8, 8, dtype=torch.uint8)]
    uniform = prediction_signals(Constant([0.0, 0.0, 0.0, 0.0]), images, num_classes=4, snd_pixels=16)
    assert uniform["entropy"] == pytest.approx(1.0) and uniform["kept_frac"] == 0.0
    sure = prediction_signals(Constant([20.0, 0.0, 0.0, 0.0]), images, num_classes=4, snd_pixels=16,
                              source_hist=torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert sure["entropy"] < 1e-6 and sure["kept_frac"] == 1.0 and sure["classes_present"] == 1
    assert sure["hist"] == [1.0, 0.0, 0.0, 0.0] and sure["hist_drift"] == pytest.approx(1.0)


def test_collapse_alarm_names_the_vanished_class_and_entropy_collapse():
    source = {"hist": [0.5, 0.3, 0.2], "entropy": 0.4}
    ok = {"hist": [0.45, 0.35, 0.2], "entropy": 0.3}
    bad = {"hist": [0.7, 0.29, 0.01], "entropy": 0.01}
    alarm = CollapseAlarm()
    assert alarm.check(ok, source, ["road", "car", "bike"]) == []
    warnings = alarm.check(bad, source, ["road", "car", "bike"])
    assert any("bike" in w and "vanished" in w for w in warnings)
    assert any("entropy collapsed" in w for w in warnings)


@pytest.fixture(scope="module")
def source_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("src") / "source.ckpt"
    save_model(path, build_model("tiny", num_classes=19, width=8), classes=CITYSCAPES19)
    return path


def selftrain_cfg(source_ckpt, run, length, *extra):
    """A few ``selftrain`` steps of the tiny model on ``length`` 32x64 synthetic target images, on the CPU."""
    return load_config(AdaptConfig, overrides=[
        "recipe=selftrain", f"checkpoint={source_ckpt}", f"train.out={run}",
        f"data.synthetic={{size: [32, 64], length: {length}}}", "data.crop=[32,64]", "data.batch_size=2",
        "data.num_workers=0", "train.device=cpu", "train.progress=false", "train.tensorboard=false", *extra])


def test_adapt_logs_signals_and_keeps_snapshots(tmp_path, source_ckpt):
    run = tmp_path / "run"
    run_adapt(selftrain_cfg(source_ckpt, run, 8, "train.iters=4", "monitor.every=2", "monitor.images=4",
                            "monitor.snd_pixels=64", "monitor.keep_checkpoints=true"))
    records = [json.loads(x) for x in (run / "selection.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4]
    assert records[0]["hist_drift"] == 0.0 and "checkpoint" not in records[0]
    for r in records:
        assert 0 <= r["entropy"] <= 1 and 0 <= r["kept_frac"] <= 1 and r["snd"] > 0 and len(r["hist"]) == 19
    assert load_model(run / "snapshots" / "step_2.ckpt")[0].name == "tiny"
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "unsup/snd" in m] == [0, 2, 4]


def test_monitor_can_be_switched_off(tmp_path, source_ckpt):
    run = tmp_path / "run"
    run_adapt(selftrain_cfg(source_ckpt, run, 4, "train.iters=1", "monitor.every=-1"))
    assert not (run / "selection.jsonl").exists()


def test_adapt_writes_a_report_with_curves_signals_and_before_after(tmp_path, source_ckpt):
    run = tmp_path / "run"
    run_adapt(selftrain_cfg(source_ckpt, run, 8, "train.iters=4", "train.log_every=1", "train.eval_every=2",
                            "monitor.every=2", "monitor.images=4", "data.val=synthetic:target:val",
                            "data.val_extra=[synthetic:shift:val]"))
    report = (run / "report.md").read_text()
    for section in ("## Training curves", "## Label-free signals", "## Validation mIoU over time",
                    "## Per-class IoU before / after", "## Held-out domains", "## Example predictions",
                    "## Resolved config"):
        assert section in report, section
    assert "| **mIoU** |" in report and "synthetic:shift:val" in report
    for fig in ("training", "signals", "val", "predictions"):
        assert (run / "figures" / f"{fig}.png").stat().st_size > 1000
    html = (run / "report.html").read_text()
    assert "<table>" in html and 'src="figures/predictions.png"' in html


def test_report_without_labels_shows_target_predictions_only(tmp_path, source_ckpt):
    run = tmp_path / "run"
    run_adapt(selftrain_cfg(source_ckpt, run, 4, "train.iters=1"))
    report = (run / "report.md").read_text()
    assert "## Example predictions" in report and "## Per-class IoU" not in report
