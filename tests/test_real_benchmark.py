"""The real-photo benchmark's builder, offline, from a fake raw folder with the packages' layout (no network)."""

import json
import sys
from pathlib import Path

import torch

from sfdaseg.data.datasets import build_dataset

ROOT = Path(__file__).resolve().parents[1]


def _module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import real_benchmark
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return real_benchmark


def test_build_writes_five_folder_datasets_with_held_out_target_photos(tmp_path):
    rb = _module()
    raw = rb.write_fake_raw(tmp_path / "raw")
    out = tmp_path / "bench"
    rb.build(out, raw, lengths=[4, 2, 4, 2, 2], size=(32, 32), verbose=False)
    for split in rb.SPLITS:
        ds = build_dataset(f"folder:{out}:{split}")
        assert len(ds) == {"source/train": 4, "source/val": 2, "target/train": 4, "target/val": 2,
                           "target/test": 2}[split]
        assert ds.classes.names == tuple(rb.CLASSES)
        sample = ds[0]
        assert sample["image"].shape == (3, 32, 32) and set(torch.unique(sample["mask"]).tolist()) <= set(range(6))
    manifest = json.loads((out / "manifest.json").read_text())
    photos = {s: set(manifest["splits"][s]["photos"]) for s in ("target/train", "target/val", "target/test")}
    assert all(photos.values())
    assert not (photos["target/train"] & photos["target/test"]) and not (photos["target/val"] & photos["target/test"])
    before = sorted(p.read_bytes() for p in (out / "target" / "test" / "images").iterdir())
    rb.build(out, raw, lengths=[4, 2, 4, 2, 2], size=(32, 32), verbose=False)  # a rerun changes nothing
    assert sorted(p.read_bytes() for p in (out / "target" / "test" / "images").iterdir()) == before
