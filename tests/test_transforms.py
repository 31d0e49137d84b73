"""Paired transforms keep image and mask aligned; collate and model-input conversion."""

from __future__ import annotations

import pytest
import torch

from sfdaseg.data.transforms import (
    PairedTransform,
    RandomScale,
    build_eval_transform,
    build_train_transform,
    collate,
    to_model_input,
)

NUM = 10
# One well-separated colour per class: the image encodes its own mask.
PALETTE = torch.tensor([[(37 * c) % 256, (255 - 53 * c) % 256, (90 + 71 * c) % 256] for c in range(NUM)],
                       dtype=torch.int32)


def encoded_sample(h: int = 48, w: int = 64, block: int = 8) -> dict:
    """Blocks of classes laid out asymmetrically (a flip of one but not the other would show)."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    mask = ((xx // block) + 3 * (yy // block) + (xx // (2 * block)) ** 2) % NUM
    image = PALETTE[mask].permute(2, 0, 1).to(torch.uint8)
    return {"image": image, "mask": mask.to(torch.uint8), "name": "scene/0001"}


def decode_classes(image: torch.Tensor) -> torch.Tensor:
    """Nearest palette colour of every pixel: ``(3, H, W)`` -> ``(H, W)``."""
    pix = image.permute(1, 2, 0).to(torch.int32)[:, :, None, :]  # (H, W, 1, 3)
    return ((pix - PALETTE) ** 2).sum(-1).argmin(-1)


def interior(mask: torch.Tensor, radius: int = 1) -> torch.Tensor:
    """Pixels whose (2r+1)^2 neighbourhood holds one class (away from edges that resampling blends)."""
    m = mask.float()[None, None]
    k = 2 * radius + 1
    hi = torch.nn.functional.max_pool2d(m, k, 1, radius)
    lo = -torch.nn.functional.max_pool2d(-m, k, 1, radius)
    return (hi == lo)[0, 0] & (mask != 255)


def test_train_transform_keeps_image_and_mask_aligned():
    t = build_train_transform(resize=(80, 112), scale_range=(0.5, 2.0), crop=(64, 96), hflip=True)
    sample = encoded_sample(h=96, w=128, block=12)
    checked = 0
    for seed in range(12):
        torch.manual_seed(seed)
        out = t(sample)
        image, mask = out["image"], out["mask"]
        assert image.shape == (3, 64, 96) and mask.shape == (64, 96)
        assert image.dtype == torch.uint8 and mask.dtype == torch.uint8
        assert type(image) is torch.Tensor and type(mask) is torch.Tensor  # plain tensors, not tv_tensors
        assert out["name"] == "scene/0001"
        # Nearest interpolation for the mask: no new values appear.
        assert set(mask.unique().tolist()) <= set(range(NUM)) | {255}
        # Padding: where the mask is 255 the image is 0.
        assert (image[:, mask == 255] == 0).all()
        inner = interior(mask)
        if inner.sum() < 100:  # strongly downscaled: too few pixels away from block edges to judge
            continue
        checked += 1
        decoded = decode_classes(image)
        agree = (decoded[inner] == mask[inner].long()).float().mean()
        assert agree > 0.98, f"seed {seed}: image and mask disagree on {1 - agree:.0%} of the inner pixels"
        # The check has teeth: a mask flipped against its image would disagree on most pixels.
        assert (decoded.flip(-1)[inner] == mask[inner].long()).float().mean() < 0.5
    assert checked >= 10


def test_hflip_flips_both_and_happens_about_half_the_time():
    sample = encoded_sample()
    t = build_train_transform(resize=None, crop=None, hflip=True)
    flipped = 0
    for seed in range(40):
        torch.manual_seed(seed)
        out = t(sample)
        if torch.equal(out["image"], sample["image"]):
            assert torch.equal(out["mask"], sample["mask"])
        else:
            assert torch.equal(out["image"], sample["image"].flip(-1))
            assert torch.equal(out["mask"], sample["mask"].flip(-1))
            flipped += 1
    assert 5 < flipped < 35


def test_crop_pads_image_with_0_and_mask_with_255():
    torch.manual_seed(0)
    sample = encoded_sample(h=8, w=16)
    out = build_train_transform(resize=None, crop=(12, 20), hflip=False)(sample)
    image, mask = out["image"], out["mask"]
    assert image.shape == (3, 12, 20) and mask.shape == (12, 20)
    assert int((mask == 255).sum()) == 12 * 20 - 8 * 16
    assert (image[:, mask == 255] == 0).all()
    # The original content is intact, as one 8x16 window.
    ys, xs = torch.nonzero(mask != 255, as_tuple=True)
    y0, x0 = int(ys.min()), int(xs.min())
    assert torch.equal(mask[y0:y0 + 8, x0:x0 + 16], sample["mask"])
    assert torch.equal(image[:, y0:y0 + 8, x0:x0 + 16], sample["image"])


def test_resize_uses_nearest_for_masks():
    sample = encoded_sample(h=16, w=16, block=4)
    out = build_train_transform(resize=(37, 23), crop=None, hflip=False)(sample)
    assert out["image"].shape == (3, 37, 23) and out["mask"].shape == (37, 23)
    assert set(out["mask"].unique().tolist()) <= set(sample["mask"].unique().tolist())
    # Pixel centres: 3 -> 2 columns samples source columns 0.25 and 1.75, i.e. labels 0 and 2 (the legacy
    # floor-based NEAREST would give 0 and 1, one source pixel off the bilinear image).
    tiny = {"image": torch.zeros(3, 1, 3, dtype=torch.uint8), "mask": torch.tensor([[0, 1, 2]], dtype=torch.uint8)}
    assert build_eval_transform(resize=(1, 2), resize_mask=True)(tiny)["mask"].tolist() == [[0, 2]]


def test_random_scale_range():
    t = RandomScale((0.5, 1.5))
    sizes = set()
    for seed in range(20):
        torch.manual_seed(seed)
        out = PairedTransform(t)(encoded_sample())
        h, w = out["mask"].shape
        assert 24 <= h <= 72 and 32 <= w <= 96 and out["image"].shape[1:] == (h, w)
        assert abs(w / h - 64 / 48) < 0.1  # aspect kept
        sizes.add((h, w))
    assert len(sizes) > 5
    with pytest.raises(ValueError, match="scale_range"):
        RandomScale((2.0, 1.0))
    assert t.scale_range == (0.5, 1.5)


def test_train_transform_without_mask_and_photometric():
    torch.manual_seed(0)
    sample = encoded_sample()
    del sample["mask"]
    out = build_train_transform(resize=(24, 32), scale_range=(0.8, 1.2), crop=(16, 16), photometric=True)(sample)
    assert set(out) == {"image", "name"}
    assert out["image"].shape == (3, 16, 16) and out["image"].dtype == torch.uint8


def test_photometric_changes_image_only():
    sample = encoded_sample()
    t = build_train_transform(resize=None, crop=None, hflip=False, photometric=True)
    changed = 0
    for seed in range(10):
        torch.manual_seed(seed)
        out = t(sample)
        assert torch.equal(out["mask"], sample["mask"])
        changed += not torch.equal(out["image"], sample["image"])
    assert changed > 0


def test_eval_transform_keeps_mask_size():
    sample = encoded_sample(h=48, w=64)
    out = build_eval_transform(resize=(24, 32))(sample)
    assert out["image"].shape == (3, 24, 32) and out["image"].dtype == torch.uint8
    assert torch.equal(out["mask"], sample["mask"])
    out = build_eval_transform(resize=(24, 32), resize_mask=True)(sample)
    assert out["mask"].shape == (24, 32) and out["mask"].dtype == torch.uint8
    out = build_eval_transform(resize=None)(sample)
    assert torch.equal(out["image"], sample["image"]) and type(out["image"]) is torch.Tensor
    assert set(build_eval_transform(resize=(8, 8))({"image": sample["image"], "name": "x"})) == {"image", "name"}


def test_bad_sizes():
    with pytest.raises(ValueError, match="crop"):
        build_train_transform(resize=None, crop=(0, 4))
    with pytest.raises(ValueError, match="resize"):
        build_eval_transform(resize=(3,))


def test_collate_same_and_mixed_sizes():
    a, b = encoded_sample(h=8, w=16), encoded_sample(h=8, w=16)
    b["name"] = "other"
    batch = collate([a, b])
    assert batch["image"].shape == (2, 3, 8, 16) and batch["mask"].shape == (2, 8, 16)
    assert batch["name"] == ["scene/0001", "other"]
    c = encoded_sample(h=12, w=16)
    mixed = collate([a, c])
    assert isinstance(mixed["image"], list) and [t.shape[1] for t in mixed["image"]] == [8, 12]
    assert isinstance(mixed["mask"], list) and mixed["name"] == ["scene/0001", "scene/0001"]
    with pytest.raises(ValueError, match="keys"):
        collate([a, {"image": a["image"], "name": "x"}])


def test_collate_in_a_dataloader():
    samples = [encoded_sample(h=8, w=8) for _ in range(5)]
    loader = torch.utils.data.DataLoader(samples, batch_size=2, collate_fn=collate)
    batches = list(loader)
    assert [b["image"].shape[0] for b in batches] == [2, 2, 1]
    assert batches[0]["image"].dtype == torch.uint8


def test_to_model_input():
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    x = to_model_input(images)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 4, 4) and x.device == images.device
    assert torch.allclose(x[0, :, 0, 0], torch.tensor([0.0, 0.2, 1.0]))
    assert images.dtype == torch.uint8  # the input is left alone
    with pytest.raises(TypeError, match="uint8"):
        to_model_input(x)


def test_without_a_crop_random_scaling_keeps_every_sample_its_size():
    """Images of one size always stack into a batch: the scaled sample is cropped or padded back to its size."""
    tf = build_train_transform(resize=None, scale_range=(0.5, 2.0), crop=None, hflip=True, track_valid=True)
    contents = set()
    for seed in range(12):
        torch.manual_seed(seed)
        sample = encoded_sample()
        out = tf(sample)
        assert out["image"].shape == sample["image"].shape and out["mask"].shape == sample["mask"].shape
        # Padding (a scale below 1) is ignored in the mask and marked invalid; image pixels are valid.
        assert torch.equal(out["valid"] == 0, out["mask"] == 255)
        contents.add(out["image"].float().mean().round().item())
    assert len(contents) > 3  # the content is still seen at random scales
