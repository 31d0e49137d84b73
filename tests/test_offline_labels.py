"""Offline pseudo-label cache: fingerprint, build / resume / rebuild, multi-scale max fusion, the dataset wrapper."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from sfdaseg.data.datasets import build_dataset
from sfdaseg.data.transforms import build_train_transform, to_model_input
from sfdaseg.models import build_model
from sfdaseg.offline_labels import (
    CacheEntryError,
    OfflineLabelCache,
    WithOfflineLabels,
    build_offline_labels,
    model_fingerprint,
)

H, W = 32, 64


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = build_model("tiny", num_classes=19, width=8)
    with torch.no_grad():  # sharper logits than the N(0, 0.01) init: fewer near-ties between classes
        m.classifier[1].weight.mul_(100.0)
    return m


@pytest.fixture
def dataset():
    return build_dataset("synthetic:target:train", with_labels=False, options={"size": [H, W], "length": 6})


class CallCounter:
    """Counts the images a model is run on (a forward pre-hook)."""

    def __init__(self, model: nn.Module) -> None:
        self.images = 0
        self.handle = model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.images += args[0].shape[0]


def reference_labels(model: nn.Module, dataset: Dataset, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax / max of the upsampled softmax, batched like the build (CPU conv results depend on the batch)."""
    model.eval()
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    labels, confs = [], []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = to_model_input(images[start:start + batch_size])
            logits = F.interpolate(model(x), size=(H, W), mode="bilinear", align_corners=False)
            conf, label = torch.softmax(logits, 1).max(1)
            labels.append(label)
            confs.append(conf)
    return torch.cat(labels), torch.cat(confs)


def test_fingerprint_tracks_weights_and_extra(model):
    fp = model_fingerprint(model)
    assert len(fp) == 64 and fp == model_fingerprint(model)
    assert model_fingerprint(model, extra={"scales": [1.0, 0.5]}) != fp
    with torch.no_grad():
        model.classifier[1].bias[3] += 1e-3
    assert model_fingerprint(model) != fp
    other = build_model("tiny", num_classes=19, width=8)
    other.load_state_dict(model.state_dict())
    assert model_fingerprint(other) == model_fingerprint(model)


def test_build_then_get_round_trip_and_resume(tmp_path, model, dataset):
    cache = OfflineLabelCache(tmp_path / "pl", fingerprint=model_fingerprint(model))
    assert not cache.is_complete(dataset.names)
    model.train()
    counter = CallCounter(model)
    build_offline_labels(model, dataset, cache, device="cpu", batch_size=4)
    assert counter.images == 6
    assert model.training  # restored
    assert cache.is_complete(dataset.names)
    manifest = json.loads(cache.manifest_path.read_text())
    assert manifest["fingerprint"] == cache.fingerprint
    assert manifest["entries"][dataset.names[0]] == [H, W]

    ref_label, ref_conf = reference_labels(model, dataset, batch_size=4)
    for i, name in enumerate(dataset.names):
        label, conf = cache.get(name)
        assert label.dtype == torch.uint8 and conf.dtype == torch.uint8 and label.shape == (H, W)
        assert torch.equal(label.long(), ref_label[i])
        assert (conf.float() / 255 - ref_conf[i]).abs().max() <= 1 / 255

    # second build with the same fingerprint: nothing recomputed
    counter.images = 0
    build_offline_labels(model, dataset, cache, device="cpu", batch_size=4)
    assert counter.images == 0


def test_corrupt_entry_is_detected_and_rebuilt(tmp_path, model, dataset):
    cache = OfflineLabelCache(tmp_path, fingerprint=model_fingerprint(model))
    build_offline_labels(model, dataset, cache, device="cpu", batch_size=3)
    name = dataset.names[2]
    good = cache.get(name)
    path = cache.conf_path(name)
    path.write_bytes(path.read_bytes()[:40])  # truncated PNG
    with pytest.raises(CacheEntryError, match=str(path.name)):
        cache.get(name)
    cache.label_path(dataset.names[4]).unlink()  # a missing file too
    with pytest.raises(CacheEntryError, match="missing"):
        cache.get(dataset.names[4])
    assert not cache.is_complete(dataset.names)

    counter = CallCounter(model)
    build_offline_labels(model, dataset, cache, device="cpu", batch_size=1)
    assert counter.images == 2  # only the two broken entries
    assert torch.equal(cache.get(name)[0], good[0]) and torch.equal(cache.get(name)[1], good[1])
    assert cache.is_complete(dataset.names)


def test_stale_manifest_and_entries_of_another_model_are_not_used(tmp_path, model, dataset):
    fp = model_fingerprint(model)
    cache = OfflineLabelCache(tmp_path, fingerprint=fp)
    build_offline_labels(model, dataset, cache, device="cpu")

    # a manifest naming another model: the folder's manifest is not trusted
    data = json.loads(cache.manifest_path.read_text())
    data["fingerprint"] = "0" * 64
    cache.manifest_path.write_text(json.dumps(data))
    assert not cache.is_complete(dataset.names)
    with pytest.raises(CacheEntryError, match="build_offline_labels"):
        WithOfflineLabels(dataset, cache)

    # another fingerprint sharing the folder (same 16-character prefix): no entry is served, all are rebuilt
    other = OfflineLabelCache(tmp_path, fingerprint=fp[:16] + "f" * 48)
    assert other.folder == cache.folder
    with pytest.raises(CacheEntryError, match="another model"):
        other.get(dataset.names[0])
    counter = CallCounter(model)
    build_offline_labels(model, dataset, other, device="cpu")
    assert counter.images == 6
    assert other.is_complete(dataset.names) and not cache.is_complete(dataset.names)


class ScaleStandIn(nn.Module):
    """Spatially constant probabilities that depend on the input scale (full width or half width)."""

    def __init__(self, full: list[float], half: list[float]) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.full, self.half = torch.tensor(full), torch.tensor(half)
        self.sizes: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(tuple(x.shape[-2:]))
        probs = self.full if x.shape[-1] == W else self.half
        logits = torch.log(probs.clamp_min(1e-12))[None, :, None, None]
        # stride 4 output, like the real models
        return logits.expand(x.shape[0], -1, math.ceil(x.shape[-2] / 4), math.ceil(x.shape[-1] / 4)) + self.dummy


def test_multiscale_max_fusion(tmp_path, dataset):
    # max fusion: class 0 (peak 0.6) wins; a mean of the two scales would pick class 1 (0.475)
    stand_in = ScaleStandIn(full=[0.6, 0.4, 0.0], half=[0.0, 0.55, 0.45])
    cache = OfflineLabelCache(tmp_path, fingerprint=model_fingerprint(stand_in, extra={"scales": [1.0, 0.5]}))
    build_offline_labels(stand_in, dataset, cache, device="cpu", scales=(1.0, 0.5), batch_size=6)
    assert set(stand_in.sizes) == {(H, W), (H // 2, W // 2)}
    label, conf = cache.get(dataset.names[0])
    assert (label == 0).all()
    assert (conf == 153).all()  # 0.6 * 255

    stand_in2 = ScaleStandIn(full=[0.6, 0.4, 0.0], half=[0.0, 0.8, 0.2])
    cache2 = OfflineLabelCache(tmp_path, fingerprint="1" * 64)
    build_offline_labels(stand_in2, dataset, cache2, device="cpu", scales=(1.0, 0.5))
    label, conf = cache2.get(dataset.names[5])
    assert (label == 1).all() and (conf == 204).all()  # 0.8 * 255


class EncodedDataset(Dataset):
    """Images whose colour encodes a blocky label map (so alignment can be read back from the pixels)."""

    palette = torch.tensor([[(37 * c) % 256, (255 - 53 * c) % 256, (90 + 71 * c) % 256] for c in range(10)],
                           dtype=torch.int32)

    def __init__(self, n: int = 3) -> None:
        self.n = n

    def label(self, i: int) -> torch.Tensor:
        yy, xx = torch.meshgrid(torch.arange(48), torch.arange(64), indexing="ij")
        return (((xx // 8) + 3 * (yy // 8) + (xx // 16) ** 2 + i) % 10).to(torch.uint8)

    @property
    def names(self) -> list[str]:
        return [f"city/img_{i}" for i in range(self.n)]  # '/' in names: subfolders in the cache

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        image = self.palette[self.label(i).long()].permute(2, 0, 1).to(torch.uint8)
        return {"image": image, "name": self.names[i]}

    def decode(self, image: torch.Tensor) -> torch.Tensor:
        pix = image.permute(1, 2, 0).to(torch.int32)[:, :, None, :]
        return ((pix - self.palette) ** 2).sum(-1).argmin(-1)


def test_with_offline_labels_keeps_keys_aligned_through_a_train_transform(tmp_path):
    base = EncodedDataset()
    cache = OfflineLabelCache(tmp_path, fingerprint="a" * 64)
    sizes = {}
    for i, name in enumerate(base.names):
        label = base.label(i)
        cache.put(name, label, label * 10 + 5)  # conf encodes the label too
        sizes[name] = tuple(label.shape)
    cache.write_manifest(sizes)
    assert cache.label_path(base.names[0]).parent.name == "city"

    transform = build_train_transform(resize=None, scale_range=(0.75, 1.5), crop=(40, 56), hflip=True)
    ds = WithOfflineLabels(base, cache, transform=transform)
    assert len(ds) == 3
    torch.manual_seed(0)
    padded = 0
    for _ in range(4):
        for i in range(len(ds)):
            s = ds[i]
            image, pl, pc = s["image"], s["pl_label"], s["pl_conf"]
            assert image.shape == (3, 40, 56) and pl.shape == pc.shape == (40, 56)
            assert type(pl) is torch.Tensor and pl.dtype == torch.uint8 and pc.dtype == torch.uint8
            valid = pl != 255
            # nearest-resampled maps stay consistent with each other
            assert torch.equal(pc[valid], pl[valid] * 10 + 5) and (pc[~valid] == 255).all()
            # and with the image, away from block edges that bilinear resampling blends
            m = pl.float()[None, None]
            interior = (F.max_pool2d(m, 3, 1, 1) == -F.max_pool2d(-m, 3, 1, 1))[0, 0] & valid
            interior[[0, -1], :] = False  # the crop's border: its outer neighbours are unknown here
            interior[:, [0, -1]] = False
            assert interior.sum() > 100
            assert torch.equal(base.decode(image)[interior], pl[interior].long())
            padded += int((~valid).sum())
            assert (image[:, ~valid] == 0).all()  # padding: image 0, pseudo-label ignore
    assert padded > 0  # the scale range made some crops pad


def test_with_offline_labels_size_mismatch_and_no_transform(tmp_path):
    base = EncodedDataset(n=1)
    cache = OfflineLabelCache(tmp_path, fingerprint="b" * 64)
    name = base.names[0]
    cache.put(name, torch.zeros(48, 64, dtype=torch.uint8), torch.full((48, 64), 200, dtype=torch.uint8))
    cache.write_manifest({name: (48, 64)})
    s = WithOfflineLabels(base, cache)[0]
    assert s["pl_label"].shape == (48, 64) and (s["pl_conf"] == 200).all() and s["name"] == name

    cache.put(name, torch.zeros(24, 32, dtype=torch.uint8), torch.zeros(24, 32, dtype=torch.uint8))
    with pytest.raises(CacheEntryError, match="32x24"):
        WithOfflineLabels(base, cache)[0]


def test_build_rejects_bad_arguments(tmp_path, model, dataset):
    cache = OfflineLabelCache(tmp_path, fingerprint=model_fingerprint(model))
    with pytest.raises(ValueError, match="amp"):
        build_offline_labels(model, dataset, cache, device="cpu", amp="fp8")
    with pytest.raises(ValueError, match="scales"):
        build_offline_labels(model, dataset, cache, device="cpu", scales=(0.0,))
    with pytest.raises(ValueError, match="relative path"):
        cache.label_path("../escape")
