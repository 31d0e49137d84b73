"""Batched, on-device augmentation for self-training: ClassMix and photometric augmentation.

Every function works on a whole batch with tensor operations (no Python loop over images or classes, no host
sync) and draws its randomness from an explicit ``generator`` (a ``torch.Generator`` on the batch's device, or
``None`` for the global RNG), so a seeded generator makes a test or a run reproducible.

ClassMix (Olsson et al. 2021, as used by DACS / DAFormer): for each image, half of the classes present in its
pseudo-label are chosen at random and their pixels are pasted onto another image of the batch; labels,
weights and any per-pixel map are mixed with the same mask, so they travel with the pixels::

    mask = classmix_masks(label, num_classes=C)              # (B, H, W) bool, from each image's own classes
    x_mix, y_mix, w_mix = classmix(mask, x, label, weight)   # output j: background j, pasted from image j-1
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["classmix", "classmix_masks", "mix", "photometric_augment"]

IGNORE_INDEX = 255

# ITU-R BT.601 luma weights (those of torchvision's rgb_to_grayscale).
_LUMA = (0.299, 0.587, 0.114)


# --------------------------------------------------------------------------------------------------------------
# ClassMix
# --------------------------------------------------------------------------------------------------------------


def classmix_masks(
    labels: Tensor,
    *,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
    class_scores: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """ClassMix masks: for each image, the pixels of a random half of its classes.

    For image ``i``, ``ceil(n_i / 2)`` of the ``n_i`` classes present in ``labels[i]`` (``ignore_index`` and other
    values outside ``[0, C)`` excluded) are drawn without replacement; the mask is the pixels of image ``i``
    labelled with a drawn class.

    Args:
        labels: ``(B, H, W)`` integer pseudo-labels.
        num_classes: ``C``.
        class_scores: optional ``(B, C)`` non-negative scores (MOCM: metric-guided mixing). Classes are then
            drawn with probability proportional to their score (Gumbel-top-k on ``log score``), still
            ``ceil(n_i / 2)`` of the present ones; a present class with score 0 is drawn only after every
            present class with a positive score.
        generator: RNG on ``labels``' device, or None for the global one.
    Returns:
        ``(B, H, W)`` bool.
    """
    if labels.dim() != 3:
        raise ValueError(f"classmix_masks: expected labels of shape (B, H, W), got {tuple(labels.shape)}")
    if labels.is_floating_point():
        raise TypeError(f"classmix_masks: labels must be integers, got {labels.dtype}")
    b, h, w = labels.shape
    c = int(num_classes)
    device = labels.device
    lab = labels.long().reshape(b, -1)
    bucket = torch.where((lab >= 0) & (lab < c) & (lab != ignore_index), lab, c)  # (B, N); c = not a class
    present = torch.zeros(b, c + 1, dtype=torch.bool, device=device)
    present.scatter_(1, bucket, True)
    present = present[:, :c]  # (B, C)
    k = (present.sum(1) + 1) // 2  # (B,) half of the present classes, rounded up
    if class_scores is None:
        keys = torch.rand(b, c, generator=generator, device=device)
    else:
        if class_scores.shape != (b, c):
            raise ValueError(
                f"classmix_masks: class_scores must have shape (B, C) = {(b, c)}, got {tuple(class_scores.shape)}"
            )
        # Gumbel-top-k: the k largest log(score) + Gumbel noise are a draw of k classes without replacement with
        # probabilities proportional to score. The floor on the score keeps zero-score present classes ahead of
        # absent ones (-inf) while a positive score beats them by ~69 nats.
        exp_noise = torch.empty(b, c, device=device).exponential_(generator=generator)
        gumbel = -torch.log(exp_noise)
        keys = torch.log(class_scores.detach().float().clamp_min(1e-30)) + gumbel
    keys = keys.masked_fill(~present, -math.inf)
    order = keys.argsort(dim=1, descending=True)  # (B, C)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(c, device=device).expand(b, c))
    chosen = present & (rank < k[:, None])  # (B, C)
    chosen = torch.cat([chosen, torch.zeros(b, 1, dtype=torch.bool, device=device)], dim=1)
    return chosen.gather(1, bucket).reshape(b, h, w)


def mix(mask: Tensor, src: Tensor, dst: Tensor) -> Tensor:
    """``src`` where ``mask``, else ``dst``.

    Args:
        mask: ``(B, H, W)`` bool.
        src, dst: both ``(B, H, W)`` or both ``(B, K, H, W)`` (the mask is broadcast over ``K``).
    Returns:
        a tensor like ``dst`` (dtype promoted if ``src`` differs).
    """
    if src.shape != dst.shape:
        raise ValueError(f"mix: src and dst differ in shape: {tuple(src.shape)} vs {tuple(dst.shape)}")
    if mask.dim() != 3 or src.shape[0] != mask.shape[0] or src.shape[-2:] != mask.shape[-2:]:
        raise ValueError(f"mix: mask {tuple(mask.shape)} does not fit tensors of shape {tuple(src.shape)}")
    if src.dim() == 4:
        mask = mask[:, None]
    elif src.dim() != 3:
        raise ValueError(f"mix: expected (B, H, W) or (B, K, H, W) tensors, got {tuple(src.shape)}")
    return torch.where(mask.bool(), src, dst)


def classmix(mask: Tensor, images: Tensor, *others: Tensor, partner: Tensor | None = None) -> tuple[Tensor, ...]:
    """Paste the masked pixels of one image of the batch onto another; every other tensor follows the pixels.

    Output ``j`` takes its background from image ``j`` and, where ``mask[partner[j]]`` is set, the pixels of
    image ``partner[j]``::

        out[j] = where(mask[p], images[p], images[j])   with p = partner[j]

    The default ``partner[j] = (j - 1) % B`` (output 0 receives from the last image) pairs every image with a
    different one when ``B > 1`` (with ``B == 1`` the image is pasted onto itself: no change).

    Args:
        mask: ``(B, H, W)`` bool, computed from each image's own labels (:func:`classmix_masks`).
        images: ``(B, 3, H, W)``.
        others: tensors ``(B, H, W)`` or ``(B, K, H, W)`` mixed the same way (labels, weights, reliability, ...).
        partner: optional ``(B,)`` long, the source image of each output (any index vector).
    Returns:
        ``(mixed_images, *mixed_others)``.
    """
    b = images.shape[0]
    if partner is None:
        partner = (torch.arange(b, device=images.device) - 1) % b
    else:
        partner = partner.to(device=images.device, dtype=torch.long)
        if partner.shape != (b,):
            raise ValueError(f"classmix: partner must have shape (B,) = ({b},), got {tuple(partner.shape)}")
    src_mask = mask[partner]
    out = [mix(src_mask, images[partner], images)]
    for t in others:
        if t.shape[0] != b:
            raise ValueError(f"classmix: a tensor of shape {tuple(t.shape)} does not have the batch size {b}")
        out.append(mix(src_mask, t[partner], t))
    return tuple(out)


# --------------------------------------------------------------------------------------------------------------
# Photometric augmentation
# --------------------------------------------------------------------------------------------------------------


def _gray(x: Tensor) -> Tensor:
    """``(B, 3, H, W)`` -> luma ``(B, 1, H, W)``."""
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _hue_constants() -> tuple[list[list[float]], list[list[float]], list[list[float]]]:
    """``A, Bc, Bs`` with ``T^-1 R(theta) T = A + cos(theta) Bc + sin(theta) Bs`` for the RGB -> YIQ matrix ``T``."""
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64)
    inv = torch.linalg.inv(yiq)
    keep = torch.diag(torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    cos = torch.diag(torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64))
    sin = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    return tuple((inv @ m @ yiq).tolist() for m in (keep, cos, sin))  # type: ignore[return-value]


# Plain Python floats, computed once on the CPU at import: building the per-sample matrices from them needs no
# host-to-device copy (a copy from pageable memory would synchronise the stream).
_HUE_A, _HUE_COS, _HUE_SIN = _hue_constants()


def _hue_matrices(shift: Tensor) -> Tensor:
    """Per-sample ``(B, 3, 3)`` RGB matrices rotating the chroma plane (YIQ) by ``2 * pi * shift`` ``(B,)``."""
    theta = (2.0 * math.pi) * shift.float()
    cos, sin = torch.cos(theta), torch.sin(theta)
    entries = [_HUE_A[i][j] + _HUE_COS[i][j] * cos + _HUE_SIN[i][j] * sin for i in range(3) for j in range(3)]
    return torch.stack(entries, dim=1).reshape(-1, 3, 3)


def _gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur with a per-sample ``sigma`` ``(B,)``: one grouped conv per direction."""
    b, ch, h, w = x.shape
    r = kernel_size // 2
    pos = torch.arange(kernel_size, device=x.device, dtype=torch.float32) - r
    kern = torch.exp(-(pos[None] ** 2) / (2.0 * sigma[:, None] ** 2))  # (B, k)
    kern = kern / kern.sum(1, keepdim=True)
    kern = kern[:, None, :].expand(b, ch, kernel_size).reshape(b * ch, kernel_size)  # one per channel of a sample
    mode = "reflect" if r < h and r < w else "replicate"  # reflect needs the padding to be smaller than the image
    y = F.pad(x.reshape(1, b * ch, h, w), (r, r, r, r), mode=mode)
    y = F.conv2d(y, kern[:, None, None, :], groups=b * ch)  # horizontal
    y = F.conv2d(y, kern[:, None, :, None], groups=b * ch)  # vertical
    return y.reshape(b, ch, h, w)


def photometric_augment(
    images: Tensor,
    *,
    generator: torch.Generator | None = None,
    brightness: float = 0.2,
    contrast: float = 0.2,
    saturation: float = 0.2,
    hue: float = 0.0,
    p_jitter: float = 0.8,
    p_gray: float = 0.2,
    p_blur: float = 0.5,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
    blur_kernel: int | None = None,
) -> Tensor:
    """Per-sample colour jitter, grayscale and Gaussian blur of a batch, on its device.

    Each sample draws its own parameters; the steps run in a fixed order on the whole batch:

    1. with probability ``p_jitter``: brightness ``x * f`` (``f ~ U[1-brightness, 1+brightness]``), contrast
       (blend with the image's mean luma), saturation (blend with the pixel's luma), each factor drawn the same
       way, then, when ``hue > 0``, a hue rotation by ``U[-hue, hue]`` of a turn (a rotation of the chroma plane in
       YIQ space: a close, cheap stand-in for an HSV hue shift);
    2. with probability ``p_gray``: grayscale (luma in all three channels);
    3. with probability ``p_blur``: Gaussian blur with ``sigma ~ U[blur_sigma]``, separable, kernel size
       ``blur_kernel`` (odd; default ``2 * ceil(3 * max sigma) + 1``) for every sample.

    The values are clamped to ``[0, 1]`` after each step. Only colours change: labels stay valid.

    Args:
        images: ``(B, 3, H, W)`` float in ``[0, 1]`` (bf16 allowed; computed in float32, autocast off inside).
        generator: RNG on the images' device, or None for the global one.
    Returns:
        ``(B, 3, H, W)`` in ``[0, 1]``, the input's dtype.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"photometric_augment: expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"photometric_augment: expected float images in [0, 1], got {images.dtype}")
    lo_s, hi_s = float(blur_sigma[0]), float(blur_sigma[1])
    if not 0 < lo_s <= hi_s:
        raise ValueError(f"photometric_augment: blur_sigma must satisfy 0 < min <= max, got {blur_sigma}")
    if blur_kernel is None:
        blur_kernel = 2 * math.ceil(3.0 * hi_s) + 1
    if blur_kernel < 1 or blur_kernel % 2 == 0:
        raise ValueError(f"photometric_augment: blur_kernel must be a positive odd integer, got {blur_kernel}")
    b = images.shape[0]
    device = images.device
    with torch.autocast(device_type=device.type, enabled=False):
        x = images.float()
        # All draws at once, in a fixed layout, so the result depends only on the generator state.
        u = torch.rand(b, 8, generator=generator, device=device)
        jitter = u[:, 0] < p_jitter
        gray = u[:, 5] < p_gray
        blur = u[:, 6] < p_blur

        def factor(col: int, amount: float) -> Tensor:
            f = 1.0 + float(amount) * (2.0 * u[:, col] - 1.0)
            return torch.where(jitter, f, torch.ones_like(f))[:, None, None, None]  # (B, 1, 1, 1)

        if brightness > 0:
            x = (x * factor(1, brightness)).clamp_(0.0, 1.0)
        if contrast > 0:
            f = factor(2, contrast)
            mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
            x = (f * x + (1.0 - f) * mean).clamp_(0.0, 1.0)
        if saturation > 0:
            f = factor(3, saturation)
            x = (f * x + (1.0 - f) * _gray(x)).clamp_(0.0, 1.0)
        if hue > 0:
            mats = _hue_matrices(float(hue) * (2.0 * u[:, 4] - 1.0))  # (B, 3, 3)
            hued = torch.einsum("bij,bjhw->bihw", mats, x).clamp_(0.0, 1.0)
            x = torch.where(jitter[:, None, None, None], hued, x)
        if p_gray > 0:
            x = torch.where(gray[:, None, None, None], _gray(x).expand_as(x), x)
        if p_blur > 0:
            sigma = lo_s + (hi_s - lo_s) * u[:, 7]
            x = torch.where(blur[:, None, None, None], _gaussian_blur(x, sigma, blur_kernel).clamp_(0.0, 1.0), x)
    return x.to(images.dtype)
