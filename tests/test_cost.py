"""Model cost: parameters, GFLOPs (a multiply-add = 2 FLOPs) and latency; reported by ``sfdaseg evaluate``."""

import json

import pytest
import torch
from torch import nn

from sfdaseg.config import EvaluateConfig, load_config
from sfdaseg.data.classes import CITYSCAPES19
from sfdaseg.models import save_model
from sfdaseg.evaluation.cost import format_cost, model_cost
from sfdaseg.models import build_model
from sfdaseg.runs.evaluate import run_evaluate


def test_flops_of_one_conv_equal_the_analytic_count():
    conv = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)
    cost = model_cost(conv, size=(16, 20), device="cpu", warmup=1, repeats=3)
    h_out, w_out = 8, 10
    assert cost["gflops"] * 1e9 == pytest.approx(2 * 8 * 3 * 3 * 3 * h_out * w_out)  # 2 FLOPs per multiply-add
    assert cost["params"] == 8 * 3 * 3 * 3 + 8
    assert cost["latency_ms"] > 0 and cost["latency_ms_min"] <= cost["latency_ms"]
    assert cost["size"] == [16, 20] and cost["batch_size"] == 1 and cost["repeats"] == 3


def test_tiny_model_cost():
    model = build_model("tiny", num_classes=19, width=8).train()
    cost = model_cost(model, size=(32, 64), device="cpu", warmup=1, repeats=2)
    assert cost["params"] == sum(p.numel() for p in model.parameters())
    assert cost["gflops"] > 0
    assert model.training  # the mode is restored
    # FLOPs grow with the pixel count (convolutions only: exactly 4x for a 2x larger side at these sizes).
    big = model_cost(model, size=(64, 128), device="cpu", warmup=0, repeats=1)
    assert big["gflops"] == pytest.approx(4 * cost["gflops"], rel=0.02)
    assert "GFLOPs at 32x64" in format_cost(cost)
    assert model_cost(model, size=(32, 64), warmup=5, repeats=20, max_time_s=0.0)["repeats"] == 1  # budget spent
    with pytest.raises(ValueError, match="amp"):
        model_cost(model, size=(32, 64), amp="fp8")


@pytest.mark.parametrize("cost", [True, False])
def test_evaluate_json_has_the_cost(tmp_path, cost):
    torch.manual_seed(0)
    ckpt = save_model(tmp_path / "m.ckpt", build_model("tiny", num_classes=19, width=8), classes=CITYSCAPES19)
    out = tmp_path / "eval.json"
    cfg = load_config(EvaluateConfig, overrides=[
        f"checkpoint={ckpt}", "data=synthetic:target:val", "synthetic={size: [32, 64], length: 4}",
        "resize=[16, 32]", "num_workers=0", "device=cpu", f"json={out}", f"cost={str(cost).lower()}"])
    run_evaluate(cfg)
    result = json.loads(out.read_text())
    if not cost:
        assert "cost" not in result
        return
    c = result["cost"]
    assert {"params", "gflops", "latency_ms"} <= set(c)
    assert c["params"] == sum(p.numel() for p in build_model("tiny", num_classes=19, width=8).parameters())
    assert c["size"] == [16, 32] and c["gflops"] > 0 and c["latency_ms"] > 0
