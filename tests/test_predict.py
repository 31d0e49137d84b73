"""``sfdaseg predict``: every output of every image, batching, sliding window, palettes, ids, bad files, CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from sfdaseg.cli import main
from sfdaseg.config import ConfigError, PredictConfig, load_config
from sfdaseg.data.classes import (CITYSCAPES19, CITYSCAPES_NAMES, CITYSCAPES_PALETTE, PROTOCOLS, ClassSpec,
                                  default_palette)
from sfdaseg.data.datasets import DatasetError, DatasetWarning
from sfdaseg.models import load_model, save_model
from sfdaseg.evaluation import predict_logits
from sfdaseg.models import build_model
from sfdaseg.runs.predict import id_table, list_images, prediction_classes, run_predict

NAMES = ("road", "tree", "sky")
PALETTE = ((10, 20, 30), (200, 0, 0), (0, 0, 250))
# name -> (H, W); two sizes share a batch, one image is alone in its size, subfolders are kept.
IMAGES = {"a.png": (48, 64), "b.jpg": (48, 64), "street/c.png": (48, 64), "street/deep/d.png": (40, 56)}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: with tiny tensors on a shared, busy machine, two spinning OpenMP threads are up to
    100x slower than one (conftest sets two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_images(root, images=IMAGES, seed=0):
    rng = np.random.default_rng(seed)
    for name, (h, w) in images.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        # Smooth blobs rather than noise: JPEG keeps them close, and the model sees some structure.
        base = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        Image.fromarray(base).resize((w, h), Image.BILINEAR).save(path, quality=95)
    return root


def tiny_checkpoint(path, classes=ClassSpec(names=NAMES, palette=PALETTE), seed=0):
    """A random tiny model whose classifier is scaled up, so its classes are far apart and all occur."""
    torch.manual_seed(seed)
    model = build_model("tiny", num_classes=classes.num_classes, width=8)
    torch.nn.init.normal_(model.classifier[1].weight, std=1.0)
    return save_model(path, model, classes=classes)


def reference_probs(ckpt, image_path, **kwargs):
    """Probabilities of one image, computed directly with predict_logits (batch of 1)."""
    model, _ = load_model(ckpt)
    image = torch.from_numpy(np.array(Image.open(image_path).convert("RGB"))).permute(2, 0, 1)[None]
    return predict_logits(model, image, **kwargs)[0]  # (C, H, W)


def predict_cfg(ckpt, images, out, *overrides):
    return load_config(PredictConfig, overrides=[f"checkpoint={ckpt}", f"images={images}", f"out={out}",
                                                 "num_workers=0", "progress=false", *overrides])


def read(path):
    return np.array(Image.open(path))


def test_writes_labels_colours_overlays_and_maps_for_every_image(tmp_path):
    images = write_images(tmp_path / "images")
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    out = tmp_path / "preds"
    result = run_predict(predict_cfg(ckpt, images, out, "batch_size=2", "confidence=true", "entropy=true",
                                     "overlay_format=png", "alpha=0.25"))
    assert result == str(out)
    seen_classes = set()
    for name, (h, w) in IMAGES.items():
        stem = name.rsplit(".", 1)[0]
        labels = read(out / "labels" / f"{stem}.png")
        assert labels.shape == (h, w) and labels.dtype == np.uint8
        # Batched (2 images of one size per forward) == one image at a time with predict_logits.
        probs = reference_probs(ckpt, images / name)
        np.testing.assert_array_equal(labels, probs.argmax(0).numpy())
        seen_classes |= set(np.unique(labels).tolist())
        color = read(out / "color" / f"{stem}.png")
        np.testing.assert_array_equal(color, np.asarray(PALETTE, dtype=np.uint8)[labels])
        rgb = read(images / name).astype(np.float32)
        overlay = read(out / "overlay" / f"{stem}.png").astype(np.float32)
        assert np.abs(overlay - (0.75 * rgb + 0.25 * color)).max() <= 0.51
        conf = read(out / "confidence" / f"{stem}.png").astype(np.float32)
        assert np.abs(conf - probs.max(0).values.numpy() * 255).max() <= 0.51
        ent = -(probs * probs.clamp_min(1e-12).log()).sum(0) / math.log(len(NAMES))
        assert np.abs(read(out / "entropy" / f"{stem}.png") - ent.numpy() * 255).max() <= 0.51
    assert seen_classes == {0, 1, 2}  # the scaled classifier makes every class occur somewhere


def test_optional_outputs_are_off_by_default_and_can_be_switched_off(tmp_path):
    images = write_images(tmp_path / "images", {"x.png": (32, 40)})
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    run_predict(predict_cfg(ckpt, images, tmp_path / "p1"))
    assert sorted(p.name for p in (tmp_path / "p1").iterdir()) == ["color", "labels", "overlay"]
    assert (tmp_path / "p1" / "overlay" / "x.jpg").is_file()
    run_predict(predict_cfg(ckpt, images, tmp_path / "p2", "color=false", "overlay=false"))
    assert sorted(p.name for p in (tmp_path / "p2").iterdir()) == ["labels"]


def test_auto_mode_slides_over_images_larger_than_the_threshold(tmp_path):
    sizes = {"small.png": (40, 48), "large.png": (72, 100), "large2.png": (72, 100)}
    images = write_images(tmp_path / "images", sizes)
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    out = tmp_path / "preds"
    run_predict(predict_cfg(ckpt, images, out, "slide_above=64", "crop=[32,48]", "stride=[16,24]", "batch_size=2"))
    slide = dict(mode="slide", crop=(32, 48), stride=(16, 24))
    np.testing.assert_array_equal(read(out / "labels" / "large2.png"),
                                  reference_probs(ckpt, images / "large2.png", **slide).argmax(0).numpy())
    large_slide = reference_probs(ckpt, images / "large.png", **slide).argmax(0).numpy()
    large_whole = reference_probs(ckpt, images / "large.png").argmax(0).numpy()
    assert (large_slide != large_whole).any()  # the two modes are distinguishable on this image
    np.testing.assert_array_equal(read(out / "labels" / "large.png"), large_slide)
    np.testing.assert_array_equal(read(out / "labels" / "small.png"),
                                  reference_probs(ckpt, images / "small.png").argmax(0).numpy())
    # mode=slide forces the window on every image, small ones included (padded to the crop).
    run_predict(predict_cfg(ckpt, images, tmp_path / "all", "mode=slide", "crop=[32,48]", "stride=[16,24]"))
    np.testing.assert_array_equal(read(tmp_path / "all" / "labels" / "small.png"),
                                  reference_probs(ckpt, images / "small.png", **slide).argmax(0).numpy())


def test_unreadable_images_are_errors_naming_the_file_or_skipped_with_a_warning(tmp_path):
    images = write_images(tmp_path / "images", {"ok.png": (32, 40), "sub/trunc.png": (32, 40)})
    (images / "garbage.jpg").write_bytes(b"this is not a jpeg")
    data = (images / "sub" / "trunc.png").read_bytes()
    (images / "sub" / "trunc.png").write_bytes(data[: len(data) // 2])  # header fine, pixels cut off
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    with pytest.raises(DatasetError, match="garbage.jpg"):
        run_predict(predict_cfg(ckpt, images, tmp_path / "p1"))
    (images / "garbage.jpg").unlink()
    with pytest.raises(DatasetError, match="trunc.png"):
        run_predict(predict_cfg(ckpt, images, tmp_path / "p2"))
    (images / "garbage.jpg").write_bytes(b"this is not a jpeg")
    with pytest.warns(DatasetWarning) as record:
        run_predict(predict_cfg(ckpt, images, tmp_path / "p3", "on_error=skip"))
    messages = " ".join(str(w.message) for w in record)
    assert "garbage.jpg" in messages and "trunc.png" in messages
    assert [p.name for p in (tmp_path / "p3" / "labels").rglob("*.png")] == ["ok.png"]


def test_image_listing(tmp_path):
    images = write_images(tmp_path / "images", {"a.png": (8, 8), "x/b.JPG": (8, 8), ".hidden/c.png": (8, 8),
                                                 "preds/old.png": (8, 8)})
    (images / "notes.txt").write_text("not an image")
    found = list_images(images, exclude=images / "preds")  # outputs inside the input folder are not inputs
    assert [name for _, name in found] == ["a", "x/b"]
    assert list_images(images / "a.png") == [(images / "a.png", "a")]
    (images / "a.jpg").write_bytes((images / "a.png").read_bytes())
    with pytest.raises(DatasetError, match="same prediction files"):
        list_images(images)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images found"):
        list_images(tmp_path / "empty")


def test_class_colours_come_from_the_spec_else_cityscapes_else_a_generated_palette():
    spec = ClassSpec(names=NAMES, palette=PALETTE)
    assert prediction_classes(spec, 3) is spec
    assert prediction_classes(ClassSpec(names=CITYSCAPES_NAMES), 19).colors == CITYSCAPES_PALETTE
    no_palette = prediction_classes(None, 19)
    assert no_palette.names == CITYSCAPES_NAMES and no_palette.colors == CITYSCAPES_PALETTE
    sixteen = tuple(CITYSCAPES_NAMES[i] for i in PROTOCOLS[16])  # matched by name
    cs_colors = {p: tuple(CITYSCAPES_PALETTE[i] for i in PROTOCOLS[p]) for p in (16, 13)}
    assert prediction_classes(ClassSpec(names=sixteen), 16).colors == cs_colors[16]
    generic13 = ClassSpec(names=tuple(f"c{i}" for i in range(13)))  # matched by the protocol
    assert prediction_classes(generic13, 13, protocol=13).colors == cs_colors[13]
    assert prediction_classes(generic13, 13).colors == default_palette(13)
    assert prediction_classes(None, 5).names == tuple(f"class_{i}" for i in range(5))
    with pytest.raises(ValueError, match="3 classes but the model predicts 4"):
        prediction_classes(spec, 4)


def test_ids_trainid_and_labelid_tables():
    assert id_table(CITYSCAPES19, "class") is None
    np.testing.assert_array_equal(id_table(CITYSCAPES19, "trainid")[:19], np.arange(19))
    labelid = id_table(CITYSCAPES19, "labelid")
    assert labelid[0] == 7 and labelid[10] == 23 and labelid[18] == 33  # road, sky, bicycle
    sixteen = ClassSpec(names=tuple(CITYSCAPES_NAMES[i] for i in PROTOCOLS[16]))
    np.testing.assert_array_equal(id_table(sixteen, "trainid")[:16], PROTOCOLS[16])
    with pytest.raises(ConfigError, match="not Cityscapes classes"):
        id_table(ClassSpec(names=NAMES), "labelid")


def test_labelids_end_to_end(tmp_path):
    images = write_images(tmp_path / "images", {"a.png": (32, 40)})
    ckpt = tiny_checkpoint(tmp_path / "m.pt", classes=ClassSpec(names=CITYSCAPES_NAMES))  # no palette stored
    run_predict(predict_cfg(ckpt, images, tmp_path / "cls"))
    run_predict(predict_cfg(ckpt, images, tmp_path / "lid", "ids=labelid"))
    cls = read(tmp_path / "cls" / "labels" / "a.png")
    lid = read(tmp_path / "lid" / "labels" / "a.png")
    np.testing.assert_array_equal(lid, id_table(CITYSCAPES19, "labelid")[cls])
    np.testing.assert_array_equal(read(tmp_path / "cls" / "color" / "a.png"),
                                  np.asarray(CITYSCAPES_PALETTE, dtype=np.uint8)[cls])


def test_config_errors_name_the_key(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    (tmp_path / "images").mkdir()
    with pytest.raises(ConfigError, match="stride"):
        predict_cfg(ckpt, tmp_path / "images", tmp_path / "o", "crop=[32,32]", "stride=[48,16]")
    with pytest.raises(ConfigError, match="images: no such folder"):
        predict_cfg(ckpt, tmp_path / "nope", tmp_path / "o")
    with pytest.raises(ConfigError, match="mode"):
        predict_cfg(ckpt, tmp_path / "images", tmp_path / "o", "mode=sliding")


def test_cli_predict_prints_the_output_folder_and_a_summary(tmp_path, capsys):
    images = write_images(tmp_path / "images", {"a.png": (32, 40), "b.png": (32, 40), "c.png": (24, 40)})
    ckpt = tiny_checkpoint(tmp_path / "m.pt")
    out = tmp_path / "preds"
    code = main(["predict", "--checkpoint", str(ckpt), "--images", str(images), "--out", str(out), "--batch-size",
                 "2", "--confidence", "num_workers=1", "progress=false"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out.strip().splitlines()[-1] == str(out)
    assert "3 image(s)" in captured.err and "images/s" in captured.err
    assert len(list((out / "confidence").glob("*.png"))) == 3
    assert main(["predict", "--checkpoint", str(ckpt), "--images", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "images: no such folder" in capsys.readouterr().err
