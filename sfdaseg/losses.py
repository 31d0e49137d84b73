"""Pure loss functions. The ignore index is handled here, once."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sfdaseg.data.classes import IGNORE_INDEX


def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of ``(B, C, h, w)`` logits to ``size = (H, W)`` (no-op when already that size)."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def seg_cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = IGNORE_INDEX,
                      pixel_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel cross-entropy, averaged over non-ignored pixels (weighted mean when ``pixel_weight`` is given).

    Args:
        logits: ``(B, C, h, w)``, upsampled here to the target size.
        target: ``(B, H, W)`` class indices (any integer dtype), ``ignore_index`` where unlabelled.
        pixel_weight: optional ``(B, H, W)`` non-negative weights; the loss is ``sum(w * ce) / sum(w)`` over valid
            pixels.
    Returns:
        a scalar; 0 (with grad) when no pixel is valid.
    """
    logits = resize_logits(logits, tuple(target.shape[-2:]))
    target = target.long()
    ce = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
    valid = (target != ignore_index).to(ce.dtype)
    w = valid if pixel_weight is None else valid * pixel_weight.to(ce.dtype)
    # clamp keeps an all-ignored batch at 0 instead of NaN, without a host-side check.
    return (ce * w).sum() / w.sum().clamp_min(1e-6)
