"""Dataset readers on tiny fake copies of each official layout, written into tmp_path."""

from __future__ import annotations

import struct
import sys
import types
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sfdaseg.data.classes import CITYSCAPES19
from sfdaseg.data.datasets import (
    DATASETS,
    DatasetError,
    DatasetSpec,
    DatasetWarning,
    build_dataset,
    load_folder_classes,
    parse_dataset_spec,
)
from sfdaseg.data.transforms import build_train_transform, collate

H, W = 8, 16

# Cityscapes labelIds and the trainIds we expect (written out, not taken from the table under test).
LABELID_EXPECT = {7: 0, 26: 13, 0: 255, 8: 1, 33: 18, 3: 255, 24: 11, 11: 2, 29: 255, 31: 16}
# SYNTHIA ids (first channel of a 16-bit PNG) and expected trainIds; 300 needs the full 16 bits to read.
SYNTHIA_EXPECT = {3: 0, 2: 2, 8: 13, 1: 10, 0: 255, 300: 255, 21: 3, 11: 18, 9: 7, 259: 255}


# ---------------------------------------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------------------------------------


def rgb(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def pattern(values, h: int = H, w: int = W) -> np.ndarray:
    """Every value appears; ``out[y, x] = values[(x + 3 y) % len(values)]``."""
    values = np.asarray(list(values))
    yy, xx = np.mgrid[0:h, 0:w]
    return values[(xx + 3 * yy) % len(values)]


def expected(raw: np.ndarray, table: dict[int, int]) -> np.ndarray:
    return np.vectorize(lambda v: table[int(v)])(raw).astype(np.uint8)


def save_rgb(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def save_gray(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)  # 2-D uint8 -> mode L
    return path


def save_palette(path: Path, array: np.ndarray) -> Path:
    """A palette PNG whose indices are the label ids (how GTA5 ships its labels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.frombytes("P", (array.shape[1], array.shape[0]), array.astype(np.uint8).tobytes())
    im.putpalette([(i * 7) % 256 for i in range(768)])
    im.save(path)
    return path


def save_png16_rgb(path: Path, array: np.ndarray) -> Path:
    """A real 16-bit-per-channel RGB PNG (colour type 2, bit depth 16); Pillow cannot write these."""
    assert array.dtype == np.uint16 and array.ndim == 3 and array.shape[2] == 3
    h, w, _ = array.shape
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))  # filter 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path


def check_image(sample: dict, array: np.ndarray) -> None:
    assert sample["image"].dtype == torch.uint8
    assert tuple(sample["image"].shape) == (3, array.shape[0], array.shape[1])
    assert torch.equal(sample["image"], torch.from_numpy(array).permute(2, 0, 1))


def check_mask(sample: dict, want: np.ndarray) -> None:
    assert sample["mask"].dtype == torch.uint8
    assert tuple(sample["mask"].shape) == want.shape
    np.testing.assert_array_equal(sample["mask"].numpy(), want)


# ---------------------------------------------------------------------------------------------------------
# Fake trees
# ---------------------------------------------------------------------------------------------------------


def make_gta5(root: Path, n: int = 3) -> dict:
    out = {}
    for i in range(1, n + 1):
        name = f"{i:05d}"
        img = save_rgb(root / "images" / f"{name}.png", rgb(i))
        raw = np.roll(pattern(LABELID_EXPECT), i, axis=1)
        save_palette(root / "labels" / f"{name}.png", raw)
        out[name] = (rgb(i), raw, img)
    return out


def make_cityscapes(root: Path, split: str = "val") -> dict:
    out = {}
    for k, (city, frame) in enumerate([("frankfurt", "000000_000294"), ("frankfurt", "000001_000019"),
                                        ("lindau", "000000_000019")]):
        stem = f"{city}_{frame}"
        save_rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", rgb(k))
        raw = np.roll(pattern(LABELID_EXPECT), k, axis=0)
        save_gray(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", raw)
        # Files of the official package that must not be taken for labels.
        save_gray(root / "gtFine" / split / city / f"{stem}_gtFine_instanceIds.png", np.full((H, W), 26))
        save_rgb(root / "gtFine" / split / city / f"{stem}_gtFine_color.png", rgb(99))
        out[f"{city}/{stem}_leftImg8bit"] = (rgb(k), raw)
    return out


# ---------------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------------


def test_gta5_reads_palette_labels_as_label_ids(tmp_path):
    truth = make_gta5(tmp_path)
    ds = build_dataset(f"gta5:{tmp_path}")
    assert len(ds) == 3 and ds.names == ["00001", "00002", "00003"]
    assert ds.classes == CITYSCAPES19 and ds.protocol == 19
    for i, name in enumerate(ds.names):
        s = ds[i]
        assert s["name"] == name and set(s) == {"image", "mask", "name"}
        check_image(s, truth[name][0])
        check_mask(s, expected(truth[name][1], LABELID_EXPECT))


def test_gta5_split_list_file(tmp_path):
    make_gta5(tmp_path)
    (tmp_path / "val.txt").write_text("00002.png\n00003.png\n")
    ds = build_dataset(f"gta5:{tmp_path}:val")
    assert ds.names == ["00002", "00003"]
    with pytest.raises(DatasetError, match="nope.txt"):
        build_dataset(f"gta5:{tmp_path}:nope")


def test_synthia_16bit_labels_first_channel(tmp_path):
    truth = {}
    for i in range(2):
        name = f"{i:07d}"
        save_rgb(tmp_path / "RGB" / f"{name}.png", rgb(i))
        cls = np.roll(pattern(SYNTHIA_EXPECT), i, axis=1).astype(np.uint16)
        label = np.stack([cls, (cls * 37 + 1000).astype(np.uint16), np.zeros_like(cls)], axis=-1)  # G: instances
        save_png16_rgb(tmp_path / "GT" / "LABELS" / f"{name}.png", label)
        truth[name] = (rgb(i), cls)
    ds = build_dataset(f"synthia:{tmp_path}")
    assert ds.names == ["0000000", "0000001"] and ds.protocol == 16
    for i, name in enumerate(ds.names):
        s = ds[i]
        check_image(s, truth[name][0])
        check_mask(s, expected(truth[name][1], SYNTHIA_EXPECT))


def test_cityscapes_val(tmp_path):
    truth = make_cityscapes(tmp_path, "val")
    ds = build_dataset(f"cityscapes:{tmp_path}:val")
    assert ds.names == sorted(truth) and len(ds) == 3
    assert ds.names[0] == "frankfurt/frankfurt_000000_000294_leftImg8bit"
    for i, name in enumerate(ds.names):
        check_image(ds[i], truth[name][0])
        check_mask(ds[i], expected(truth[name][1], LABELID_EXPECT))
    with pytest.raises(DatasetError, match="leftImg8bit"):  # no train split written
        build_dataset(f"cityscapes:{tmp_path}")
    with pytest.raises(DatasetError, match="did you mean 'val'"):
        build_dataset(f"cityscapes:{tmp_path}:vall")


def test_nthu_cities_and_splits(tmp_path):
    truth = {}
    for c, city in enumerate(["Rome", "Tokyo"]):
        for k, stem in enumerate(["pano_00368_0_0", "pano_00390_1_180"]):
            save_rgb(tmp_path / city / "Images" / "Test" / f"{stem}.png", rgb(10 * c + k))
            raw = np.roll(pattern(LABELID_EXPECT), k + c, axis=1)
            save_gray(tmp_path / city / "Labels" / "Test" / f"{stem}_eval.png", raw)
            truth[f"{city}/{stem}"] = (rgb(10 * c + k), raw)
        save_rgb(tmp_path / city / "Images" / "Train" / "pano_01000_0_0.jpg", rgb(50 + c))

    ds = build_dataset(f"nthu:{tmp_path}:Rome/test")
    assert ds.names == ["Rome/pano_00368_0_0", "Rome/pano_00390_1_180"] and ds.protocol == 13
    for i, name in enumerate(ds.names):
        check_image(ds[i], truth[name][0])
        check_mask(ds[i], expected(truth[name][1], LABELID_EXPECT))
    assert len(build_dataset(f"nthu:{tmp_path}:test")) == 4  # every city
    assert build_dataset(f"nthu:{tmp_path}:rome/TEST").names == ds.names  # case-insensitive

    train = build_dataset(f"nthu:{tmp_path}:Tokyo/train", with_labels=False)
    assert train.names == ["Tokyo/pano_01000_0_0"] and "mask" not in train[0]
    assert train[0]["image"].shape == (3, H, W)  # JPEG decodes (lossy, so only the shape is checked)
    with pytest.raises(DatasetError, match="Labels"):  # the Train split has no labels
        build_dataset(f"nthu:{tmp_path}:Tokyo/train")
    with pytest.raises(DatasetError, match=r"'Taipei'.*\['Rome', 'Tokyo'\]"):  # absent city: lists those found
        build_dataset(f"nthu:{tmp_path}:Taipei/test")
    with pytest.raises(DatasetError, match="did you mean 'Tokyo'"):
        build_dataset(f"nthu:{tmp_path}:tokio/test")


def make_acdc(root: Path) -> dict:
    truth = {}
    for c, cond in enumerate(["fog", "night", "rain", "snow"]):
        seq = f"GOPR03{c}5"
        stem = f"{seq}_frame_0001{c}8"
        save_rgb(root / "rgb_anon" / cond / "val" / seq / f"{stem}_rgb_anon.png", rgb(c))
        raw = np.roll(pattern(LABELID_EXPECT), c, axis=1)
        gt = root / "gt" / cond / "val" / seq
        save_gray(gt / f"{stem}_gt_labelIds.png", raw)
        save_gray(gt / f"{stem}_gt_labelTrainIds.png", np.full((H, W), 5))  # not ours to read
        save_gray(gt / f"{stem}_gt_invIds.png", np.full((H, W), 1))
        save_rgb(root / "rgb_anon" / cond / "train" / seq / f"{seq}_frame_0002{c}0_rgb_anon.png", rgb(20 + c))
        truth[f"{cond}/{seq}/{stem}_rgb_anon"] = (rgb(c), raw)
    return truth


def test_acdc_conditions(tmp_path):
    truth = make_acdc(tmp_path)
    ds = build_dataset(f"acdc:{tmp_path}:val")
    assert ds.names == sorted(truth)
    for i, name in enumerate(ds.names):
        check_image(ds[i], truth[name][0])
        check_mask(ds[i], expected(truth[name][1], LABELID_EXPECT))
    night = build_dataset(f"acdc:{tmp_path}:night/val")
    assert night.names == ["night/GOPR0315/GOPR0315_frame_000118_rgb_anon"] and night.split == "night/val"
    train = build_dataset(f"acdc:{tmp_path}", with_labels=False)  # default split: train, four conditions
    assert len(train) == 4 and "mask" not in train[0]
    with pytest.raises(DatasetError, match="did you mean 'night'"):
        build_dataset(f"acdc:{tmp_path}:nigth/val")


def test_darkzurich_val_and_train(tmp_path):
    seq = "GOPR0356"
    truth = {}
    for k in range(2):
        stem = f"{seq}_frame_00032{k}"
        save_rgb(tmp_path / "rgb_anon" / "val" / "night" / seq / f"{stem}_rgb_anon.png", rgb(k))
        raw = np.roll(pattern(LABELID_EXPECT), k, axis=0)
        save_gray(tmp_path / "gt" / "val" / "night" / seq / f"{stem}_gt_labelIds.png", raw)
        truth[f"night/{seq}/{stem}_rgb_anon"] = (rgb(k), raw)
    save_rgb(tmp_path / "rgb_anon" / "train" / "night" / "GOPR0348" / "GOPR0348_frame_000001_rgb_anon.png", rgb(7))
    save_rgb(tmp_path / "rgb_anon" / "train" / "day" / "GOPR0001" / "GOPR0001_frame_000001_rgb_anon.png", rgb(8))

    ds = build_dataset(f"darkzurich:{tmp_path}:val")
    assert ds.names == sorted(truth)
    for i, name in enumerate(ds.names):
        check_image(ds[i], truth[name][0])
        check_mask(ds[i], expected(truth[name][1], LABELID_EXPECT))
    night = build_dataset(f"darkzurich:{tmp_path}:train", with_labels=False)
    assert night.names == ["night/GOPR0348/GOPR0348_frame_000001_rgb_anon"]
    day = build_dataset(f"darkzurich:{tmp_path}:train/day", with_labels=False)
    assert day.names == ["day/GOPR0001/GOPR0001_frame_000001_rgb_anon"]
    check_image(day[0], rgb(8))
    with pytest.raises(DatasetError, match="only val/night is labelled"):
        build_dataset(f"darkzurich:{tmp_path}:train")


CLASSES_YAML = """\
names: [background, road, car]
palette: [[0, 0, 0], [128, 64, 128], [0, 0, 142]]
ignore_index: 255
"""


def make_folder(root: Path, *, classes: str | None = CLASSES_YAML, values=(0, 1, 2, 255)) -> dict:
    truth = {}
    for k, name in enumerate(["a", "b", "sub/c"]):
        ext = ".png"
        save_rgb(root / "images" / f"{name}{ext}", rgb(k))
        raw = np.roll(pattern(values), k, axis=1)
        save_gray(root / "masks" / f"{name}.png", raw)
        truth[name] = (rgb(k), raw)
    if classes is not None:
        (root / "classes.yaml").write_text(classes)
    return truth


def test_folder_dataset(tmp_path):
    truth = make_folder(tmp_path)
    save_rgb(tmp_path / "images" / "d.JPG", rgb(5))  # upper-case extension, no mask -> error in raise mode
    with pytest.raises(DatasetError, match=r"d\.JPG"):
        build_dataset(f"folder:{tmp_path}")
    (tmp_path / "images" / "d.JPG").unlink()
    save_gray(tmp_path / "masks" / "orphan.png", np.zeros((H, W)))  # mask without image: ignored
    ds = build_dataset(f"folder:{tmp_path}")
    assert ds.names == ["a", "b", "sub/c"]
    assert ds.classes.names == ("background", "road", "car") and ds.classes.palette[2] == (0, 0, 142)
    for i, name in enumerate(ds.names):
        check_image(ds[i], truth[name][0])
        check_mask(ds[i], truth[name][1].astype(np.uint8))


def test_folder_duplicate_stems_and_hidden_files(tmp_path):
    save_rgb(tmp_path / "images" / "a.png", rgb(0))
    save_rgb(tmp_path / "images" / ".ipynb_checkpoints" / "a-checkpoint.png", rgb(0))
    save_rgb(tmp_path / "images" / "._b.png", rgb(0))
    assert build_dataset(f"folder:{tmp_path}", with_labels=False).names == ["a"]
    save_rgb(tmp_path / "images" / "a.jpg", rgb(0))
    with pytest.raises(DatasetError, match="unique.*'a'"):
        build_dataset(f"folder:{tmp_path}", with_labels=False)


def test_folder_image_formats(tmp_path):
    (tmp_path / "images").mkdir()
    for ext in ["png", "jpg", "jpeg", "bmp", "webp", "PNG"]:
        Image.fromarray(rgb(1)).save(tmp_path / "images" / f"x_{ext}.{ext}", format={"jpg": "JPEG"}.get(ext))
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    ds = build_dataset(f"folder:{tmp_path}", with_labels=False)
    assert len(ds) == 6 and ds.classes is None
    for s in (ds[i] for i in range(len(ds))):
        assert s["image"].shape == (3, H, W) and s["image"].dtype == torch.uint8
    lossless = {s["name"]: s for s in (ds[i] for i in range(len(ds)))}
    for name in ["x_png", "x_bmp", "x_PNG"]:
        check_image(lossless[name], rgb(1))


def test_folder_split_and_id_map(tmp_path):
    (tmp_path / "classes.yaml").write_text(
        "names: [background, road, car]\nid_map: {10: 0, 20: 1, 30: 2, 99: 255}\n"
    )
    raw = pattern([10, 20, 30, 99, 7, 0])
    save_rgb(tmp_path / "train" / "images" / "x.png", rgb(0))
    save_gray(tmp_path / "train" / "masks" / "x.png", raw)
    ds = build_dataset(f"folder:{tmp_path}:train")  # classes.yaml found in ROOT
    check_mask(ds[0], expected(raw, {10: 0, 20: 1, 30: 2, 99: 255, 7: 255, 0: 255}))


def test_folder_custom_ignore_value(tmp_path):
    make_folder(tmp_path, classes="names: [a, b, c]\nignore_index: 250\n", values=(0, 1, 2, 250))
    ds = build_dataset(f"folder:{tmp_path}")
    assert ds.classes.ignore_index == 255
    assert set(np.unique(ds[0]["mask"].numpy())) == {0, 1, 2, 255}


def test_folder_labels_outside_spec_are_an_error(tmp_path):
    make_folder(tmp_path, values=(0, 1, 2, 7, 9))
    ds = build_dataset(f"folder:{tmp_path}")
    with pytest.raises(DatasetError, match=r"a\.png.*7, 9"):
        ds[0]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("palette: [[0, 0, 0]]\n", "'names'"),
        ("names: road\n", "'names'"),
        ("names: []\n", "'names'"),
        ("names: [a, b]\npalette: [[0, 0, 0]]\n", "'palette'"),
        ("names: [a, b]\npalette: [[0, 0, 0], [1, 2, 300]]\n", "'palette'"),
        ("names: [a, b]\nignore_index: 1\n", "'ignore_index'"),
        ("names: [a, b]\nignore_index: x\n", "'ignore_index'"),
        ("names: [a, b]\nid_map: {1: 5}\n", "'id_map'"),
        ("names: [a, b]\nid_map: [1, 2]\n", "'id_map'"),
        ("names: [a, b]\npallete: [[0, 0, 0], [1, 1, 1]]\n", "pallete"),
        ("names: [a, a]\n", "unique"),
        ("- a\n- b\n", "mapping"),
        ("names: [a, b\n", "cannot read"),
    ],
)
def test_bad_classes_yaml(tmp_path, text, key):
    (tmp_path / "classes.yaml").write_text(text)
    with pytest.raises(DatasetError) as err:
        load_folder_classes(tmp_path / "classes.yaml")
    assert "classes.yaml" in str(err.value) and key in str(err.value)


def test_folder_needs_classes_yaml_for_labels(tmp_path):
    make_folder(tmp_path, classes=None)
    with pytest.raises(DatasetError, match="classes.yaml"):
        build_dataset(f"folder:{tmp_path}")
    assert len(build_dataset(f"folder:{tmp_path}", with_labels=False)) == 3
    ds = build_dataset(f"folder:{tmp_path}", options={"classes": CITYSCAPES19})  # a spec given in code
    assert ds.classes.names == CITYSCAPES19.names


# ---------------------------------------------------------------------------------------------------------
# with_labels=False never touches the label files
# ---------------------------------------------------------------------------------------------------------


def test_without_labels_mask_files_are_never_opened(tmp_path, monkeypatch):
    make_cityscapes(tmp_path, "val")
    for p in (tmp_path / "gtFine").rglob("*_labelIds.png"):
        p.write_bytes(b"garbage")  # opened -> decode error
    import sfdaseg.data.datasets as mod

    def boom(path):
        raise AssertionError(f"label file opened: {path}")

    monkeypatch.setattr(mod, "decode_label", boom)
    ds = build_dataset(f"cityscapes:{tmp_path}:val", with_labels=False)
    assert all("mask" not in ds[i] for i in range(len(ds)))

    import shutil

    shutil.rmtree(tmp_path / "gtFine")  # not even required to exist
    ds = build_dataset(f"cityscapes:{tmp_path}:val", with_labels=False)
    assert len(ds) == 3 and set(ds[0]) == {"image", "name"}


@pytest.mark.parametrize("kind", ["gta5", "synthia", "folder"])
def test_without_labels_label_folder_not_required(tmp_path, kind):
    img_dir = {"gta5": "images", "synthia": "RGB", "folder": "images"}[kind]
    save_rgb(tmp_path / img_dir / "0001.png", rgb(0))
    ds = build_dataset(f"{kind}:{tmp_path}", with_labels=False)
    assert ds.names == ["0001"] and set(ds[0]) == {"image", "name"}


# ---------------------------------------------------------------------------------------------------------
# Errors and on_error
# ---------------------------------------------------------------------------------------------------------


def test_missing_root_and_folders(tmp_path):
    missing = tmp_path / "nowhere"
    for kind in ["gta5", "synthia", "cityscapes", "nthu", "acdc", "darkzurich", "folder"]:
        with pytest.raises(DatasetError, match="nowhere.*does not exist.*[Ee]xpected layout"):
            build_dataset(f"{kind}:{missing}")
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match="no files ending"):  # empty folder
        build_dataset(f"gta5:{tmp_path}", with_labels=False)
    save_rgb(tmp_path / "images" / "00001.png", rgb(0))
    with pytest.raises(DatasetError, match=r"labels.*does not exist"):
        build_dataset(f"gta5:{tmp_path}")


def test_missing_masks_raise_or_skip(tmp_path):
    make_gta5(tmp_path)
    (tmp_path / "labels" / "00002.png").unlink()
    with pytest.raises(DatasetError, match=r"00002\.png"):
        build_dataset(f"gta5:{tmp_path}")
    with pytest.warns(DatasetWarning, match=r"00002\.png"):
        ds = build_dataset(f"gta5:{tmp_path}", on_error="skip")
    assert ds.names == ["00001", "00003"]


@pytest.mark.parametrize("damage", ["truncated", "zero-byte", "garbage"])
def test_unreadable_image_raise_or_skip(tmp_path, damage):
    truth = make_gta5(tmp_path)
    path = tmp_path / "images" / "00002.png"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "zero-byte": b"", "garbage": b"not a png" * 10}[damage])

    ds = build_dataset(f"gta5:{tmp_path}")
    assert ds[0]["name"] == "00001"
    with pytest.raises(DatasetError, match=r"00002\.png"):
        ds[1]

    ds = build_dataset(f"gta5:{tmp_path}", on_error="skip")
    with pytest.warns(DatasetWarning, match=r"00002\.png"):
        s = ds[1]
    assert s["name"] == "00003"  # deterministic: the next readable sample
    check_image(s, truth["00003"][0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ds[1]["name"] == "00003"  # remembered: no second decode attempt or warning


def test_skip_wraps_around_and_fails_when_nothing_is_readable(tmp_path):
    make_gta5(tmp_path, n=2)
    (tmp_path / "images" / "00002.png").write_bytes(b"")
    ds = build_dataset(f"gta5:{tmp_path}", on_error="skip")
    with pytest.warns(DatasetWarning):
        assert ds[1]["name"] == "00001"
    (tmp_path / "images" / "00001.png").write_bytes(b"")
    ds = build_dataset(f"gta5:{tmp_path}", on_error="skip")
    with pytest.warns(DatasetWarning), pytest.raises(DatasetError, match="no readable sample"):
        ds[0]


def test_mask_of_another_size(tmp_path):
    make_gta5(tmp_path, n=1)
    save_palette(tmp_path / "labels" / "00001.png", np.full((H + 2, W), 7))
    ds = build_dataset(f"gta5:{tmp_path}")
    with pytest.raises(DatasetError) as err:
        ds[0]
    msg = str(err.value)
    assert "images/00001.png" in msg.replace("\\", "/") and "labels/00001.png" in msg.replace("\\", "/")
    assert f"{W}x{H}" in msg and f"{W}x{H + 2}" in msg


def test_colour_mask_in_folder_is_an_error(tmp_path):
    make_folder(tmp_path)
    save_rgb(tmp_path / "masks" / "a.png", rgb(3))
    with pytest.raises(DatasetError, match=r"a\.png.*single-channel"):
        build_dataset(f"folder:{tmp_path}")[0]


def test_bad_on_error_value(tmp_path):
    make_gta5(tmp_path, n=1)
    with pytest.raises(ValueError, match="on_error"):
        build_dataset(f"gta5:{tmp_path}", on_error="ignore")


# ---------------------------------------------------------------------------------------------------------
# Spec parsing, registry, builder
# ---------------------------------------------------------------------------------------------------------


def test_parse_dataset_spec():
    assert parse_dataset_spec("gta5:/data/gta5") == DatasetSpec("gta5", "/data/gta5", None)
    assert parse_dataset_spec("cityscapes:/data/cs:val") == DatasetSpec("cityscapes", "/data/cs", "val")
    assert parse_dataset_spec("acdc:data/acdc:night/val") == DatasetSpec("acdc", "data/acdc", "night/val")
    assert parse_dataset_spec("folder:./mine") == DatasetSpec("folder", "./mine", None)
    assert parse_dataset_spec("Synthetic:target:val") == DatasetSpec("synthetic", "target", "val")
    assert parse_dataset_spec(r"folder:C:\data\mine") == DatasetSpec("folder", r"C:\data\mine", None)
    assert parse_dataset_spec(r"folder:C:\data\mine:train") == DatasetSpec("folder", r"C:\data\mine", "train")
    assert str(parse_dataset_spec("cityscapes:/data/cs:val")) == "cityscapes:/data/cs:val"
    for bad in ["/data/gta5", "gta5:", ":x", "gta5:/x:"]:
        with pytest.raises(DatasetError, match="KIND:ROOT"):
            parse_dataset_spec(bad)


def test_unknown_kind_suggests_close_matches():
    with pytest.raises(DatasetError) as err:
        build_dataset("cityscape:/data/cs:val")
    msg = str(err.value)
    assert "did you mean 'cityscapes'" in msg and "darkzurich" in msg  # lists every choice
    with pytest.raises(DatasetError, match="did you mean 'gta5'"):
        parse_dataset_spec("gta:/x")


def test_registry_is_a_plain_dict():
    assert type(DATASETS) is dict
    assert set(DATASETS) == {"gta5", "synthia", "cityscapes", "nthu", "acdc", "darkzurich", "folder", "synthetic"}


def test_unknown_option_is_an_error(tmp_path):
    make_gta5(tmp_path, n=1)
    with pytest.raises(DatasetError, match="unknown option.*colour"):
        build_dataset(f"gta5:{tmp_path}", options={"colour": 1})


def test_relative_root(tmp_path, monkeypatch):
    make_gta5(tmp_path / "data" / "gta5", n=1)
    monkeypatch.chdir(tmp_path)
    assert len(build_dataset("gta5:data/gta5")) == 1


def test_synthetic_kind_is_built_lazily(monkeypatch):
    calls = []

    class FakeSynthetic:
        def __init__(self, **kwargs):
            calls.append(kwargs)

    module = types.ModuleType("sfdaseg.data.synthetic")
    module.SyntheticDataset = FakeSynthetic
    monkeypatch.setitem(sys.modules, "sfdaseg.data.synthetic", module)
    transform = object()
    build_dataset("synthetic:target:val", with_labels=False, transform=transform, options={"size": 32})
    build_dataset("synthetic:source")
    assert calls[0] == {"domain": "target", "split": "val", "with_labels": False, "transform": transform, "size": 32}
    assert calls[1]["domain"] == "source" and calls[1]["split"] == "train" and calls[1]["with_labels"] is True


def test_transform_and_dataloader(tmp_path):
    make_gta5(tmp_path, n=3)
    ds = build_dataset(f"gta5:{tmp_path}", transform=build_train_transform(resize=None, crop=(6, 6)))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 3, 6, 6) and batch["mask"].shape == (2, 6, 6)
    assert batch["name"] == ["00001", "00002"]
    # DataLoader workers receive the dataset pickled.
    import pickle

    clone = pickle.loads(pickle.dumps(ds))
    assert clone.names == ds.names and clone[2]["mask"].shape == (6, 6)
