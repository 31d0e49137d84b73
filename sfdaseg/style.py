"""Intra-domain style augmentation: re-style each target image with the statistics of another target image.

UniSFDA feeds the student target images whose *appearance* is borrowed from other target images of the
batch, so the model learns to ignore the variation of style inside the target domain. No source data is
used. Only appearance changes (the geometry stays where it was), so labels, weights and every per-pixel map
stay aligned with the re-styled image.

Two kinds:

* ``"fourier"``: FDA (Yang & Soatto, CVPR 2020) between target images. The amplitude of the centred
  low-frequency band of image ``i``'s spectrum is replaced by that of a donor image ``j`` (optionally
  interpolated with weight ``alpha``), the phase of ``i`` is kept, then the inverse FFT, clamped to
  ``[0, 1]``. The band is FDA's: ``b = floor(min(H, W) * beta)`` and the frequencies ``|ky| <= b``,
  ``|kx| <= b``, a centred ``(2b + 1)^2`` square (the DC term, i.e. the mean colour, included). ``beta = 0``
  disables the swap (FDA's reference code would still swap the DC term).
* ``"adain"``: the per-channel mean and standard deviation of image ``i`` are replaced by a mix of its own
  and those of the donor, ``mu = mu_i + alpha (mu_j - mu_i)`` (same for sigma): AdaIN (Huang & Belongie
  2017) without a decoder, applied to the image; :func:`adain_style` does the same on any ``(B, C, H, W)``
  tensor, and :func:`restyle_features` applies it to a module's output (feature-level, MixStyle-like).

Donors form a random cyclic permutation of the batch (:func:`style_partners`): every image gets a donor other
than itself when ``B > 1``. Each image is re-styled with probability ``p``; ``alpha`` is a fixed weight or,
when None, drawn from ``U(0, 1)`` per image. The settings of UniSFDA's style augmentation are not published
(**reconstructed**): defaults follow FDA (``beta = 0.01``, full swap).

Everything runs on the batch's device with tensor operations (no loop over images, no host sync) and draws its
randomness from an explicit ``generator``, like :mod:`sfdaseg.augment`::

    augment = build_style_augment(StyleConfig(kind="fourier", beta=0.01, p=0.5))
    x_styled = augment(x, generator)   # (B, 3, H, W) in [0, 1] -> same shape, dtype and device
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from sfdaseg.config_base import ConfigError, choices

__all__ = [
    "STYLE_KINDS",
    "StyleAugment",
    "StyleConfig",
    "adain_style",
    "build_style_augment",
    "fourier_style",
    "restyle_features",
    "style_partners",
]

STYLE_KINDS = ("fourier", "adain", "none")


@dataclass
class StyleConfig:
    """Intra-domain style augmentation (a config section; see the module docstring).

    Attributes:
        kind: ``"fourier"`` (low-frequency amplitude swap, FDA), ``"adain"`` (mean/std swap) or ``"none"``.
        beta: ``fourier`` only: half-size of the swapped band as a fraction of the shorter image side (FDA's
            ``L``), in ``[0, 0.5]``.
        alpha: weight of the donor's style in ``[0, 1]`` (1: full swap, 0: no change); None draws it from
            ``U(0, 1)`` per image.
        p: probability that an image is re-styled.
    """

    kind: str = choices(*STYLE_KINDS, default="fourier")
    beta: float = 0.01
    alpha: float | None = 1.0
    p: float = 0.5

    def validate(self, prefix: str = "style") -> None:
        if self.kind not in STYLE_KINDS:
            raise ConfigError(f"{prefix}.kind: expected one of {', '.join(STYLE_KINDS)}, got {self.kind!r}")
        if not 0.0 <= float(self.beta) <= 0.5:
            raise ConfigError(f"{prefix}.beta: expected a fraction of the image side in [0, 0.5], got {self.beta}")
        if self.alpha is not None and not 0.0 <= float(self.alpha) <= 1.0:
            raise ConfigError(f"{prefix}.alpha: expected a weight in [0, 1] or null (U(0, 1)), got {self.alpha}")
        if not 0.0 <= float(self.p) <= 1.0:
            raise ConfigError(f"{prefix}.p: expected a probability in [0, 1], got {self.p}")


# --------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------


def style_partners(batch_size: int, *, generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> Tensor:
    """The donor of each image: a random cyclic permutation ``(B,)`` long (no image is its own donor if B > 1).

    A random order ``o`` of the batch is drawn and ``o[k]`` takes its style from ``o[k + 1]`` (cyclically).
    """
    order = torch.randperm(batch_size, generator=generator, device=device)
    partner = torch.empty_like(order)
    partner[order] = order.roll(-1)
    return partner


def _check_images(images: Tensor, what: str) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{what}: expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"{what}: expected float images in [0, 1], got {images.dtype}")


def _check_partner(partner: Tensor, b: int, what: str) -> Tensor:
    if partner.shape != (b,):
        raise ValueError(f"{what}: partner must have shape (B,) = ({b},), got {tuple(partner.shape)}")
    return partner.long()


def _weight(alpha: float | Tensor, b: int, device: torch.device) -> Tensor | float:
    """``alpha`` as a float or a ``(B, 1, 1, 1)`` float32 tensor."""
    if isinstance(alpha, Tensor):
        if alpha.shape != (b,):
            raise ValueError(f"style: alpha must be a float or a (B,) = ({b},) tensor, got {tuple(alpha.shape)}")
        return alpha.to(device=device, dtype=torch.float32).reshape(b, 1, 1, 1)
    return float(alpha)


def _band_rows(h: int, half: int) -> list[slice]:
    """Rows of the centred band ``|ky| <= half`` in the (unshifted) FFT layout: ``[0, half]`` and the last ``half``."""
    if 2 * half + 1 >= h:
        return [slice(0, h)]
    rows = [slice(0, half + 1)]
    if half > 0:
        rows.append(slice(h - half, h))
    return rows


def fourier_style(images: Tensor, *, partner: Tensor, beta: float = 0.01, alpha: float | Tensor = 1.0) -> Tensor:
    """Replace the low-frequency amplitude of each image by its donor's (FDA); phase kept, clamped to ``[0, 1]``.

    The band is ``|ky| <= b, |kx| <= b`` with ``b = floor(min(H, W) * beta)``; inside it the amplitude becomes
    ``A_i + alpha (A_partner[i] - A_i)``. The band is symmetric under ``k -> -k`` and both amplitudes are those
    of real images, so the new spectrum stays that of a real image (``rfft2`` / ``irfft2`` suffice).

    Args:
        images: ``(B, 3, H, W)`` float in ``[0, 1]`` (computed in float32, autocast off inside).
        partner: ``(B,)`` long, the donor of each image.
        beta: band half-size as a fraction of the shorter side, in ``[0, 0.5]``; 0 returns the input.
        alpha: donor weight, a float or a ``(B,)`` tensor.
    Returns:
        ``(B, 3, H, W)`` in ``[0, 1]``, the input's dtype.
    """
    _check_images(images, "fourier_style")
    b, _, h, w = images.shape
    partner = _check_partner(partner, b, "fourier_style")
    if not 0.0 <= float(beta) <= 0.5:
        raise ValueError(f"fourier_style: beta must be in [0, 0.5], got {beta}")
    if float(beta) == 0.0 or (not isinstance(alpha, Tensor) and float(alpha) == 0.0):
        return images
    half = math.floor(min(h, w) * float(beta))
    cols = slice(0, min(half, w // 2) + 1)
    a = _weight(alpha, b, images.device)
    with torch.autocast(device_type=images.device.type, enabled=False):
        spec = torch.fft.rfft2(images.float())  # (B, 3, H, W//2 + 1) complex64
        for rows in _band_rows(h, half):  # at most two row blocks of the band, not a loop over images
            band = spec[:, :, rows, cols].clone()  # a copy: the in-place write below must not alter it
            amp = band.abs()
            amp = amp + a * (amp[partner] - amp)
            spec[:, :, rows, cols] = torch.polar(amp, band.angle())
        out = torch.fft.irfft2(spec, s=(h, w)).clamp_(0.0, 1.0)
    return out.to(images.dtype)


def adain_style(x: Tensor, *, partner: Tensor, alpha: float | Tensor = 1.0, eps: float = 1e-5) -> Tensor:
    """Re-normalise each sample's channels to a mix of its own and its donor's mean / std (no clamp).

    ``out = (x - mu_i) / sigma_i * sigma_mix + mu_mix`` with ``mu_mix = mu_i + alpha (mu_j - mu_i)``, same for
    ``sigma``, statistics over ``(H, W)`` per sample and channel. As in MixStyle, the statistics are detached:
    gradients flow through the normalised content, not through the style. A per-channel affine map with a
    positive scale: the spatial structure of every channel is kept exactly.

    Args:
        x: ``(B, C, H, W)`` float: images or features.
        partner: ``(B,)`` long, the donor of each sample.
        alpha: donor weight, a float or a ``(B,)`` tensor.
        eps: added to the variance.
    Returns:
        ``(B, C, H, W)`` in ``x``'s dtype.
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"adain_style: expected a float tensor of shape (B, C, H, W), got {tuple(x.shape)} {x.dtype}")
    b = x.shape[0]
    partner = _check_partner(partner, b, "adain_style")
    if not isinstance(alpha, Tensor) and float(alpha) == 0.0:
        return x
    a = _weight(alpha, b, x.device)
    with torch.autocast(device_type=x.device.type, enabled=False):
        xf = x.float()
        var, mu = torch.var_mean(xf.detach(), dim=(2, 3), keepdim=True, correction=0)  # (B, C, 1, 1)
        sigma = (var + eps).sqrt()
        mu_mix = mu + a * (mu[partner] - mu)
        sigma_mix = sigma + a * (sigma[partner] - sigma)
        out = (xf - mu) * (sigma_mix / sigma) + mu_mix
    return out.to(x.dtype)


# --------------------------------------------------------------------------------------------------------------
# The batch augmentation
# --------------------------------------------------------------------------------------------------------------


def _draw(cfg: StyleConfig, b: int, device: torch.device, generator: torch.Generator | None
          ) -> tuple[Tensor, Tensor, Tensor | float]:
    """``(partner, apply, alpha)``, drawn in a fixed layout so the result depends only on the generator state."""
    partner = style_partners(b, generator=generator, device=device)
    u = torch.rand(b, 2, generator=generator, device=device)
    apply = u[:, 0] < float(cfg.p)
    alpha: Tensor | float = u[:, 1] if cfg.alpha is None else float(cfg.alpha)
    return partner, apply, alpha


@dataclass(frozen=True)
class StyleAugment:
    """``augment(images, generator=None) -> images``: see :func:`build_style_augment`."""

    cfg: StyleConfig

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``(B, 3, H, W)`` float in ``[0, 1]`` -> re-styled ``(B, 3, H, W)`` in ``[0, 1]``, same dtype and device."""
        _check_images(images, f"style augmentation ({self.cfg.kind})")
        cfg = self.cfg
        if cfg.kind == "none" or cfg.p == 0.0 or (cfg.alpha == 0.0) or (cfg.kind == "fourier" and cfg.beta == 0.0):
            return images  # nothing would change: skip the draws too
        partner, apply, alpha = _draw(cfg, images.shape[0], images.device, generator)
        if cfg.kind == "fourier":
            out = fourier_style(images, partner=partner, beta=cfg.beta, alpha=alpha)
        else:
            out = adain_style(images, partner=partner, alpha=alpha).clamp_(0.0, 1.0)
        if cfg.p >= 1.0:
            return out
        return torch.where(apply[:, None, None, None], out, images)


def build_style_augment(cfg: StyleConfig | None = None) -> StyleAugment:
    """The batch style augmentation of ``cfg`` (validated; default ``StyleConfig()``).

    Returns a callable ``augment(images, generator=None)``: ``images`` ``(B, 3, H, W)`` float in ``[0, 1]`` on
    any device, ``generator`` an RNG on that device or None for the global one. Each image is re-styled with
    probability ``cfg.p`` using the style of another image of the batch (:func:`style_partners`).
    """
    cfg = StyleConfig() if cfg is None else cfg
    cfg.validate()
    return StyleAugment(cfg)


@contextlib.contextmanager
def restyle_features(module: nn.Module, *, alpha: float | None = 1.0, p: float = 0.5,
                     generator: torch.Generator | None = None) -> Iterator[None]:
    """Feature-level AdaIN: inside the block, ``module``'s tensor output is re-styled on every call.

    Each call draws donors (:func:`style_partners`), per-sample application with probability ``p`` and
    ``alpha`` (None: ``U(0, 1)`` per sample) from ``generator``, and applies :func:`adain_style` to the output
    ``(B, C, H, W)``. Use it around the student's forward on target images, e.g.
    ``with restyle_features(model.backbone.layer1, generator=g): logits = model(x)``. The hook is removed on exit.
    """
    cfg = StyleConfig(kind="adain", alpha=alpha, p=p)
    cfg.validate("restyle_features")

    def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> Tensor:
        if not isinstance(output, Tensor) or output.dim() != 4:
            raise TypeError(
                f"restyle_features: expected the module to return a (B, C, H, W) tensor, got {type(output).__name__}"
            )
        if cfg.p == 0.0 or cfg.alpha == 0.0:
            return output
        partner, apply, a = _draw(cfg, output.shape[0], output.device, generator)
        styled = adain_style(output, partner=partner, alpha=a)
        return styled if cfg.p >= 1.0 else torch.where(apply[:, None, None, None], styled, output)

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
