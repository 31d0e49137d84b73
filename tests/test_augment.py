"""ClassMix masks and mixing; batched photometric augmentation."""

from __future__ import annotations

import pytest
import torch

from sfdaseg.augment import classmix, classmix_masks, mix, photometric_augment

IGN = 255
C = 6
# One colour per class: an image that encodes its own label map.
PALETTE = torch.tensor([[0.1 * c + 0.05, 1.0 - 0.15 * c, (0.37 * c) % 1.0] for c in range(C)] + [[0.0, 0.0, 0.0]])


def random_labels(b: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Blocky labels with a few classes per image and some ignore pixels."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, C + 1, (b, h // 4, w // 4), generator=g)
    coarse[coarse == C] = IGN
    return coarse.repeat_interleave(4, 1).repeat_interleave(4, 2)


def colour(labels: torch.Tensor) -> torch.Tensor:
    idx = torch.where(labels == IGN, C, labels)
    return PALETTE[idx].permute(0, 3, 1, 2).contiguous()


def test_classmix_masks_cover_exactly_half_of_the_present_classes():
    labels = random_labels(5, 32, 32, seed=0)
    g = torch.Generator().manual_seed(1)
    mask = classmix_masks(labels, num_classes=C, generator=g)
    assert mask.shape == labels.shape and mask.dtype == torch.bool
    for i in range(labels.shape[0]):
        present = set(labels[i].unique().tolist()) - {IGN}
        chosen = set(labels[i][mask[i]].unique().tolist())
        assert IGN not in chosen
        assert chosen <= present and len(chosen) == (len(present) + 1) // 2
        # the mask is exactly the pixels of the chosen classes
        expected = torch.zeros_like(mask[i])
        for c in chosen:
            expected |= labels[i] == c
        assert torch.equal(mask[i], expected)


def test_classmix_masks_deterministic_and_random_over_draws():
    labels = random_labels(3, 16, 16, seed=2)
    m1 = classmix_masks(labels, num_classes=C, generator=torch.Generator().manual_seed(7))
    m2 = classmix_masks(labels, num_classes=C, generator=torch.Generator().manual_seed(7))
    assert torch.equal(m1, m2)
    g = torch.Generator().manual_seed(8)
    draws = {tuple(classmix_masks(labels, num_classes=C, generator=g)[0].flatten().tolist()) for _ in range(20)}
    assert len(draws) > 1


def test_classmix_masks_all_ignore_and_single_class():
    labels = torch.full((2, 4, 4), IGN)
    labels[1] = 3
    mask = classmix_masks(labels, num_classes=C)
    assert not mask[0].any() and mask[1].all()  # one present class -> ceil(1/2) = 1 -> all of it


def test_classmix_masks_class_scores_guide_the_draw():
    labels = torch.zeros(2, 4, 8, dtype=torch.long)
    labels[:, :, 2:4] = 1
    labels[:, :, 4:6] = 2
    labels[:, :, 6:] = 3  # 4 classes present -> 2 chosen
    scores = torch.ones(2, C)
    scores[0, 2] = 1e30  # image 0: class 2 always chosen
    scores[1, 0] = 0.0  # image 1: class 0 never chosen (three classes with a positive score remain)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        mask = classmix_masks(labels, num_classes=C, class_scores=scores, generator=g)
        assert mask[0][labels[0] == 2].all()
        assert not mask[1][labels[1] == 0].any()
        assert mask[0].sum() == 16 and mask[1].sum() == 16  # still half of the present classes
    with pytest.raises(ValueError, match="class_scores"):
        classmix_masks(labels, num_classes=C, class_scores=torch.ones(2, C + 1))


def test_mix_shapes():
    mask = torch.tensor([[[True, False]]])
    a, b = torch.ones(1, 3, 1, 2), torch.zeros(1, 3, 1, 2)
    assert mix(mask, a, b)[0, :, 0].tolist() == [[1, 0]] * 3
    assert mix(mask, torch.ones(1, 1, 2), torch.zeros(1, 1, 2)).tolist() == [[[1, 0]]]
    with pytest.raises(ValueError):
        mix(mask, a, torch.zeros(1, 3, 2, 2))


def test_classmix_moves_labels_and_weights_with_the_pixels():
    labels = random_labels(4, 32, 32, seed=3)
    images = colour(labels)
    weights = torch.rand(4, 32, 32, generator=torch.Generator().manual_seed(4))
    mask = classmix_masks(labels, num_classes=C, generator=torch.Generator().manual_seed(5))
    x, y, w = classmix(mask, images, labels, weights)
    assert x.shape == images.shape and y.shape == labels.shape and w.shape == weights.shape
    # the colour of every mixed pixel still encodes its mixed label
    assert torch.equal(x, colour(y))
    # output j: background from image j, pasted pixels of image j-1 where image j-1's mask is set
    for j in range(4):
        p = (j - 1) % 4
        assert torch.equal(y[j][mask[p]], labels[p][mask[p]])
        assert torch.equal(y[j][~mask[p]], labels[j][~mask[p]])
        assert torch.equal(w[j][mask[p]], weights[p][mask[p]])
    # an explicit partner vector
    partner = torch.tensor([2, 0, 1, 3])
    x2, y2 = classmix(mask, images, labels, partner=partner)
    assert torch.equal(y2[3], labels[3])  # mixed with itself
    assert torch.equal(y2[0][mask[2]], labels[2][mask[2]])
    assert torch.equal(x2, colour(y2))


# -- photometric ---------------------------------------------------------------------------------------------------


def smooth_images(b: int = 4, h: int = 24, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g)


def test_photometric_shape_range_and_determinism():
    x = smooth_images()
    y1 = photometric_augment(x, generator=torch.Generator().manual_seed(0), hue=0.1)
    y2 = photometric_augment(x, generator=torch.Generator().manual_seed(0), hue=0.1)
    y3 = photometric_augment(x, generator=torch.Generator().manual_seed(1), hue=0.1)
    assert y1.shape == x.shape and y1.dtype == x.dtype
    assert y1.min() >= 0 and y1.max() <= 1
    assert torch.equal(y1, y2) and not torch.equal(y1, y3)
    assert not torch.equal(y1, x)


def test_photometric_identity_when_every_probability_is_zero():
    x = smooth_images()
    y = photometric_augment(x, p_jitter=0.0, p_gray=0.0, p_blur=0.0, hue=0.2)
    assert torch.equal(y, x)


def test_photometric_grayscale_gives_equal_channels():
    x = smooth_images()
    y = photometric_augment(x, p_jitter=0.0, p_gray=1.0, p_blur=0.0)
    assert torch.allclose(y[:, 0], y[:, 1]) and torch.allclose(y[:, 1], y[:, 2])
    expected = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    torch.testing.assert_close(y[:, 0], expected)


def test_photometric_blur_reduces_high_frequencies_per_sample():
    x = smooth_images(b=3, h=32, w=32)
    y = photometric_augment(x, p_jitter=0.0, p_gray=0.0, p_blur=1.0, blur_sigma=(1.0, 2.0))

    def hf(t: torch.Tensor) -> torch.Tensor:  # energy of horizontal differences per image
        return (t[..., 1:] - t[..., :-1]).pow(2).mean(dim=(1, 2, 3))

    assert (hf(y) < 0.5 * hf(x)).all()
    # the mean colour is kept by a normalised kernel (up to the borders)
    torch.testing.assert_close(y.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=0.02, rtol=0)


def test_photometric_jitter_changes_colour_but_not_geometry():
    # a two-region image: after colour jitter the two regions are still separated exactly where they were
    x = torch.zeros(2, 3, 8, 8)
    x[:, :, :, 4:] = 0.8
    x[:, :, :, :4] = 0.2
    y = photometric_augment(x, generator=torch.Generator().manual_seed(3), p_jitter=1.0, p_gray=0.0, p_blur=0.0,
                            brightness=0.3, contrast=0.3, saturation=0.3)
    assert (y[:, :, :, :4] < y[:, :, :, 4:].amin(dim=-1, keepdim=True)).all()


def test_photometric_bf16_and_autocast():
    x = smooth_images().bfloat16()
    y = photometric_augment(x, generator=torch.Generator().manual_seed(0))
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = photometric_augment(smooth_images(), generator=torch.Generator().manual_seed(0))
    assert z.dtype == torch.float32 and torch.isfinite(z).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_augment_does_not_sync_with_the_host():
    dev = torch.device("cuda")
    labels = random_labels(4, 32, 32, seed=0).to(dev)
    images = torch.rand(4, 3, 32, 32, device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    scores = torch.rand(4, C, device=dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mask = classmix_masks(labels, num_classes=C, generator=g)
        mask = classmix_masks(labels, num_classes=C, class_scores=scores, generator=g)
        classmix(mask, images, labels, images[:, 0])
        photometric_augment(images, generator=g, hue=0.1)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            photometric_augment(images.bfloat16(), generator=g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
