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


def soft_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor, *,
                       temperature: float = 1.0, pixel_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Distillation loss ``-sum_c p_t log softmax(z_s / T)``, averaged over pixels.

    Args:
        student_logits: ``(B, C, h, w)``, upsampled here to the teacher's size.
        teacher_probs: ``(B, C, H, W)`` probabilities (already softened with the same temperature), no grad.
        pixel_weight: optional ``(B, H, W)`` weights (weighted mean).
    """
    logits = resize_logits(student_logits, tuple(teacher_probs.shape[-2:])).float()
    per_pixel = -(teacher_probs.float() * torch.log_softmax(logits / temperature, dim=1)).sum(1)
    if pixel_weight is None:
        return per_pixel.mean()
    w = pixel_weight.float()
    return (per_pixel * w).sum() / w.sum().clamp_min(1e-6)
