"""``sfdaseg export``: ONNX graphs that match PyTorch at several sizes, the fixed-size fallback, failures that
write nothing, and ``predict`` on the ONNX file agreeing with ``predict`` on the checkpoint."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from sfdaseg.cli import main
from sfdaseg.config import ConfigError, ExportConfig, PredictConfig, load_config
from sfdaseg.data.classes import ClassSpec
from sfdaseg.models import load_model, save_model
from sfdaseg.models import MODELS, SegmentationModel, build_model
from sfdaseg.runs import export as export_mod
from sfdaseg.runs.export import ExportError, LogitsAtInputSize, OnnxSegmenter, onnx_session, run_export
from sfdaseg.runs.predict import run_predict

CLASSES = ClassSpec(names=("road", "tree", "sky"), palette=((10, 20, 30), (200, 0, 0), (0, 0, 250)))


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread (onnxruntime follows torch): two spinning threads crawl on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def checkpoint(path, name="tiny", classes=CLASSES, **options):
    """A random model with a scaled-up classifier (logits of order 1, so differences are not hidden by scale)."""
    torch.manual_seed(0)
    model = build_model(name, num_classes=classes.num_classes, **options)
    torch.nn.init.normal_(model.classifier[1].weight, std=1.0)
    torch.nn.init.normal_(model.classifier[1].bias, std=0.5)
    return save_model(path, model, classes=classes)


def export_cfg(ckpt, out, *overrides):
    return load_config(ExportConfig, overrides=[f"checkpoint={ckpt}", f"out={out}", "size=[64,96]", *overrides])


@pytest.mark.parametrize("name, options", [("tiny", {"width": 8}), ("lraspp_mobilenet_v3_large", {})])
def test_export_matches_pytorch_at_two_sizes(tmp_path, capsys, name, options):
    ckpt = checkpoint(tmp_path / "m.pt", name, **options)
    out = tmp_path / "model.onnx"
    assert run_export(export_cfg(ckpt, out)) == str(out)
    err = capsys.readouterr().err
    assert "dynamic batch and image size" in err and "max abs diff" in err
    reported = float(err.split("max abs diff ")[1].split()[0])
    assert reported < 1e-4

    proto = onnx.load(str(out))
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) >= 17
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, "height", "width"]
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["sfdaseg"])
    assert meta["model"] == name and meta["classes"]["names"] == list(CLASSES.names)

    # Independently of the export's own check: other sizes and batch sizes, normalisation included.
    model, _ = load_model(ckpt)
    graph = LogitsAtInputSize(model).eval()
    session = onnx_session(out)
    gen = torch.Generator().manual_seed(1)
    for shape in [(1, 3, 64, 96), (3, 3, 40, 72)]:
        x = torch.rand(*shape, generator=gen)
        with torch.no_grad():
            ref = graph(x).numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        assert got.shape == (shape[0], 3, shape[2], shape[3])  # logits at the input resolution
        diff = float(np.abs(got - ref).max())
        assert diff < 1e-4, (name, shape, diff)
        assert np.abs(ref).max() > 0.1  # the comparison is not between two near-zero tensors


def test_a_mismatch_above_the_tolerance_fails_and_writes_nothing(tmp_path, monkeypatch):
    ckpt = checkpoint(tmp_path / "m.pt", width=8)
    real = export_mod._ort_logits
    monkeypatch.setattr(export_mod, "_ort_logits", lambda session, x: real(session, x) + 0.01)
    out = tmp_path / "out" / "model.onnx"
    with pytest.raises(ExportError, match=r"max abs logit difference 0\.01 > tolerance 0\.001"):
        run_export(export_cfg(ckpt, out))
    assert list((tmp_path / "out").iterdir()) == []  # neither the file nor its temporary
    assert run_export(export_cfg(ckpt, out, "tolerance=0.05")) == str(out)  # a looser tolerance accepts it


class FrozenSizeNet(SegmentationModel):
    """Works in PyTorch at any size, but reads its feature size as Python ints, which the tracer freezes."""

    def __init__(self, *, num_classes: int, normalization="imagenet") -> None:
        super().__init__(name="frozen_size", num_classes=num_classes, feature_dim=8, output_stride=2,
                         normalization=normalization, dropout=0.0, build_args={})
        self.backbone = nn.Conv2d(3, 8, 3, stride=2, padding=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        y = self.backbone(x)  # (B, 8, H/2, W/2)
        h, w = int(y.shape[2]), int(y.shape[3])
        return y + F.interpolate(F.avg_pool2d(y, 2), size=(h, w), mode="bilinear", align_corners=False)


def frozen_size(*, num_classes: int, weights=None, normalization="imagenet") -> FrozenSizeNet:
    return FrozenSizeNet(num_classes=num_classes, normalization=normalization)


def test_a_model_that_freezes_its_size_is_exported_for_a_fixed_size(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(MODELS, "frozen_size", frozen_size)
    ckpt = checkpoint(tmp_path / "m.pt", "frozen_size")
    out = tmp_path / "fixed.onnx"
    run_export(export_cfg(ckpt, out))
    err = capsys.readouterr().err
    assert "cannot take dynamic image sizes" in err and "fixed 64x96" in err and "max abs diff" in err
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, 64, 96]
    # predict's runner resizes other sizes to the graph's size (its logits come back at that size).
    runner = OnnxSegmenter(out)
    assert runner.fixed_size == (64, 96) and runner.num_classes == 3 and runner.name == "frozen_size"
    assert runner(torch.rand(2, 3, 30, 50)).shape == (2, 3, 64, 96)


@pytest.mark.skipif(export_mod._has_onnxscript(), reason="onnxscript is installed: the dynamo exporter may run")
def test_dynamo_exporter_without_onnxscript_says_what_is_missing(tmp_path):
    ckpt = checkpoint(tmp_path / "m.pt", width=8)
    with pytest.raises(ExportError, match="onnxscript"):
        run_export(export_cfg(ckpt, tmp_path / "m.onnx", "exporter=dynamo"))


def test_config_errors(tmp_path):
    ckpt = checkpoint(tmp_path / "m.pt", width=8)
    with pytest.raises(ConfigError, match="opset: expected 17 or newer"):
        export_cfg(ckpt, tmp_path / "m.onnx", "opset=13")
    with pytest.raises(ConfigError, match="ending in .onnx"):
        export_cfg(ckpt, tmp_path / "m.pt2")


def write_images(root, sizes):
    rng = np.random.default_rng(0)
    for name, (h, w) in sizes.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        Image.fromarray(base).resize((w, h), Image.BILINEAR).save(root / name)
    return root


def test_predict_with_the_onnx_file_agrees_with_the_checkpoint(tmp_path, capsys):
    images = write_images(tmp_path / "images", {"a.png": (48, 64), "b.png": (48, 64), "sub/c.png": (40, 56),
                                                "big.png": (72, 100)})
    ckpt = checkpoint(tmp_path / "m.pt", width=8)
    onnx_file = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(onnx_file), "--size", "[48,64]"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == str(onnx_file) and "max abs diff" in captured.err

    common = [f"images={images}", "num_workers=0", "progress=false", "batch_size=2", "confidence=true",
              "slide_above=80", "crop=[32,48]"]  # big.png goes through the sliding window
    for model_file, out in [(ckpt, tmp_path / "pt"), (onnx_file, tmp_path / "onnx")]:
        run_predict(load_config(PredictConfig, overrides=[f"checkpoint={model_file}", f"out={out}", *common]))
    assert "onnxruntime" in capsys.readouterr().err
    equal = total = 0
    for name in ["a", "b", "sub/c", "big"]:
        pt = np.array(Image.open(tmp_path / "pt" / "labels" / f"{name}.png"))
        ox = np.array(Image.open(tmp_path / "onnx" / "labels" / f"{name}.png"))
        assert pt.shape == ox.shape
        equal += int((pt == ox).sum())
        total += pt.size
        # The colours come from the class spec stored in the ONNX metadata: identical where the labels are.
        same = pt == ox
        pt_color = np.array(Image.open(tmp_path / "pt" / "color" / f"{name}.png"))
        ox_color = np.array(Image.open(tmp_path / "onnx" / "color" / f"{name}.png"))
        np.testing.assert_array_equal(pt_color[same], ox_color[same])
        conf_pt = np.array(Image.open(tmp_path / "pt" / "confidence" / f"{name}.png")).astype(int)
        conf_ox = np.array(Image.open(tmp_path / "onnx" / "confidence" / f"{name}.png")).astype(int)
        assert np.abs(conf_pt - conf_ox).max() <= 1
    assert equal / total >= 0.999, equal / total
