"""Intra-domain style augmentation: only the appearance changes, so labels stay aligned."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sfdaseg.config import ConfigError
from sfdaseg.models import build_model
from sfdaseg.style import (
    StyleConfig,
    adain_style,
    build_style_augment,
    fourier_style,
    restyle_features,
    style_partners,
)

H, W = 64, 96


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def square_mask(b: int) -> torch.Tensor:
    """``(B, H, W)`` bool: a different sharp rectangle in each image."""
    mask = torch.zeros(b, H, W, dtype=torch.bool)
    for i in range(b):
        top, left = 10 + 4 * i, 15 + 7 * i
        mask[i, top:top + 28, left:left + 36] = True
    return mask


def square_images(b: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with one sharp rectangle each, on a smooth background, with distinct colours per image."""
    g = gen(seed)
    mask = square_mask(b)
    fg = 0.55 + 0.35 * torch.rand(b, 3, 1, 1, generator=g)
    bg = 0.1 + 0.3 * torch.rand(b, 3, 1, 1, generator=g)
    ramp = torch.linspace(0, 0.08, W).expand(H, W)  # a gentle background gradient
    x = torch.where(mask[:, None], fg, bg + ramp)
    return x.clamp(0, 1), mask


def smooth_images(b: int = 4, seed: int = 0) -> torch.Tensor:
    """Textured images well inside (0, 1) (no clamping after a low-frequency swap)."""
    g = gen(seed)
    coarse = torch.randn(b, 3, 8, 12, generator=g)
    x = F.interpolate(coarse, size=(H, W), mode="bicubic", align_corners=False)
    x = x + 0.3 * torch.randn(b, 3, H, W, generator=g)
    brightness = 0.3 + 0.4 * torch.rand(b, 3, 1, 1, generator=g)  # a different "style" per image
    return (brightness + 0.04 * x).clamp(0.02, 0.98)


def segment(out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Two-means segmentation of each output image, seeded by the input's mask: pixel -> nearer mean colour."""
    m = mask[:, None].float()
    mu_in = (out * m).sum((2, 3), keepdim=True) / m.sum((2, 3), keepdim=True)
    mu_out = (out * (1 - m)).sum((2, 3), keepdim=True) / (1 - m).sum((2, 3), keepdim=True)
    return ((out - mu_in).square().sum(1) < (out - mu_out).square().sum(1))


def strong_edges(img: torch.Tensor) -> torch.Tensor:
    """``(B, H-1, W-1)`` bool: pixels whose gradient magnitude exceeds half of the image's largest."""
    gx = img[:, :, :-1, 1:] - img[:, :, :-1, :-1]
    gy = img[:, :, 1:, :-1] - img[:, :, :-1, :-1]
    mag = (gx.square() + gy.square()).sum(1).sqrt()
    return mag > 0.5 * mag.amax((1, 2), keepdim=True)


def band_amplitude(x: torch.Tensor, beta: float) -> torch.Tensor:
    """Amplitudes of the centred ``(2b+1)^2`` low-frequency square (fftshifted), ``(B, 3, 2b+1, 2b+1)``."""
    b = math.floor(min(H, W) * beta)
    amp = torch.fft.fftshift(torch.fft.fft2(x.double()), dim=(-2, -1)).abs()
    cy, cx = H // 2, W // 2
    return amp[..., cy - b:cy + b + 1, cx - b:cx + b + 1]


# -- donors --------------------------------------------------------------------------------------------------


def test_partners_are_a_permutation_without_fixed_points():
    for seed in range(5):
        p = style_partners(7, generator=gen(seed))
        assert sorted(p.tolist()) == list(range(7))
        assert (p != torch.arange(7)).all()
    assert style_partners(1).tolist() == [0]
    assert not torch.equal(style_partners(8, generator=gen(0)), style_partners(8, generator=gen(1)))


# -- Fourier (FDA) -------------------------------------------------------------------------------------------


def test_fourier_low_frequency_amplitude_is_the_donors():
    x = smooth_images(4)
    partner = torch.tensor([2, 3, 1, 0])
    beta = 0.05  # b = 3: a 7x7 band
    out = fourier_style(x, partner=partner, beta=beta)
    assert out.shape == x.shape and 0 < out.min() and out.max() < 1  # no clamping happened
    torch.testing.assert_close(band_amplitude(out, beta), band_amplitude(x, beta)[partner], rtol=1e-4, atol=1e-3)
    # outside the band the amplitude is the image's own; the phase is kept everywhere
    full_out, full_x = torch.fft.fft2(out.double()), torch.fft.fft2(x.double())
    outside = torch.ones(H, W, dtype=torch.bool)
    outside[:4, :4] = outside[:4, -3:] = outside[-3:, :4] = outside[-3:, -3:] = False
    torch.testing.assert_close(full_out.abs()[..., outside], full_x.abs()[..., outside], rtol=1e-4, atol=1e-3)
    strong = full_x.abs() > 1.0
    phase_diff = torch.angle(full_out * full_x.conj())[strong]
    assert phase_diff.abs().max() < 1e-3
    # the mean colour (DC term) is the donor's
    torch.testing.assert_close(out.mean((2, 3)), x.mean((2, 3))[partner], atol=1e-4, rtol=0)


def test_fourier_ratio_interpolates_the_amplitude():
    x = smooth_images(3)
    partner = torch.tensor([1, 2, 0])
    half = fourier_style(x, partner=partner, beta=0.05, alpha=0.5)
    a = band_amplitude(x, 0.05)
    torch.testing.assert_close(band_amplitude(half, 0.05), 0.5 * (a + a[partner]), rtol=1e-4, atol=1e-3)
    per_image = fourier_style(x, partner=partner, beta=0.05, alpha=torch.tensor([0.0, 1.0, 0.5]))
    torch.testing.assert_close(per_image[0], x[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(per_image[1], fourier_style(x, partner=partner, beta=0.05)[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(per_image[2], half[2], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["fourier", "adain"])
def test_structure_stays_where_it_was(kind):
    x, mask = square_images(4)
    cfg = StyleConfig(kind=kind, beta=0.05, alpha=1.0, p=1.0)
    out = build_style_augment(cfg)(x, gen(3))
    assert out.shape == x.shape
    assert (out - x).abs().amax((1, 2, 3)).min() > 0.05  # every image really changed its appearance
    seg = segment(out, mask)
    iou = (seg & mask).sum((1, 2)).float() / (seg | mask).sum((1, 2)).float()
    assert iou.min() > 0.99
    # the strong edges of the output are the rectangle's border
    border = strong_edges(x)
    edges = strong_edges(out)
    near_border = F.max_pool2d(border[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0
    assert edges.any((1, 2)).all() and not (edges & ~near_border).any()


@pytest.mark.parametrize("kind", ["fourier", "adain"])
def test_zero_strength_is_the_identity(kind):
    x, _ = square_images(3)
    for cfg in (StyleConfig(kind=kind, alpha=0.0, p=1.0), StyleConfig(kind=kind, p=0.0)):
        assert build_style_augment(cfg)(x, gen()) is x
    if kind == "fourier":
        assert build_style_augment(StyleConfig(kind=kind, beta=0.0, p=1.0))(x, gen()) is x
        assert fourier_style(x, partner=torch.tensor([1, 2, 0]), beta=0.0) is x
    assert build_style_augment(StyleConfig(kind="none", p=1.0))(x, gen()) is x


# -- AdaIN ----------------------------------------------------------------------------------------------------


def test_adain_takes_the_donors_channel_statistics():
    x = smooth_images(4)
    partner = torch.tensor([3, 0, 1, 2])
    out = adain_style(x, partner=partner, alpha=1.0, eps=0.0)
    var, mu = torch.var_mean(x, dim=(2, 3), correction=0)
    var_o, mu_o = torch.var_mean(out, dim=(2, 3), correction=0)
    torch.testing.assert_close(mu_o, mu[partner], atol=1e-5, rtol=0)
    torch.testing.assert_close(var_o.sqrt(), var.sqrt()[partner], atol=1e-5, rtol=1e-4)
    half = adain_style(x, partner=partner, alpha=0.5, eps=0.0)
    torch.testing.assert_close(half.mean((2, 3)), 0.5 * (mu + mu[partner]), atol=1e-5, rtol=0)
    # features: any number of channels, no clamp, gradients flow through the content
    feats = torch.randn(4, 16, 8, 12, requires_grad=True)
    styled = adain_style(feats, partner=partner)
    assert styled.shape == feats.shape and styled.min() < 0
    styled.sum().backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all()


def test_restyle_features_hooks_a_module_and_removes_the_hook():
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=3, width=8).eval()
    x = smooth_images(4)
    with torch.no_grad():
        plain = model(x)
        with restyle_features(model.backbone.stage4, p=1.0, generator=gen(1)):
            styled = model(x)
        with restyle_features(model.backbone.stage4, p=0.0, generator=gen(1)):
            untouched = model(x)
        after = model(x)
    assert styled.shape == plain.shape and not torch.allclose(styled, plain)
    torch.testing.assert_close(untouched, plain)
    torch.testing.assert_close(after, plain)
    assert not model.backbone.stage4._forward_hooks


# -- the batch augmentation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fourier", "adain"])
def test_augment_is_reproducible_and_applies_per_image(kind):
    x = smooth_images(16)
    aug = build_style_augment(StyleConfig(kind=kind, beta=0.05, alpha=None, p=0.5))
    a, b = aug(x, gen(5)), aug(x, gen(5))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, aug(x, gen(6)))
    same = (a == x).flatten(1).all(1)
    assert 0 < same.sum() < 16  # some images kept as they were, the others re-styled
    assert a.min() >= 0 and a.max() <= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kind", ["fourier", "adain"])
def test_dtype_and_device_are_kept(kind, dtype):
    x = smooth_images(2).to(dtype)
    out = build_style_augment(StyleConfig(kind=kind, beta=0.05, p=1.0))(x, gen())
    assert out.dtype == dtype and out.device == x.device and out.shape == x.shape
    assert not torch.equal(out, x)


def test_config_validation_and_input_errors():
    with pytest.raises(ConfigError, match=r"style\.kind: expected one of fourier, adain, none"):
        build_style_augment(StyleConfig(kind="cyclegan"))
    with pytest.raises(ConfigError, match=r"style\.beta"):
        build_style_augment(StyleConfig(beta=0.7))
    with pytest.raises(ConfigError, match=r"style\.alpha"):
        build_style_augment(StyleConfig(alpha=1.5))
    with pytest.raises(ConfigError, match=r"style\.p"):
        build_style_augment(StyleConfig(p=-0.1))
    aug = build_style_augment(StyleConfig(p=1.0))
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, H, W\)"):
        aug(torch.rand(2, 1, 8, 8))
    with pytest.raises(TypeError, match="expected float images"):
        aug(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="partner must have shape"):
        fourier_style(torch.rand(2, 3, 8, 8), partner=torch.tensor([0, 1, 0]))
