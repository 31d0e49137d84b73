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


#: How a pixel-weighted loss is normalised (:func:`seg_cross_entropy`).
#: ``"valid"``: ``sum(w * ce) / #valid pixels``, the mean of ``w * ce`` over the labelled pixels, so the weights
#: scale the loss (DAFormer's confidence-ratio weight: a batch the teacher is unsure of teaches less);
#: ``"weight"``: ``sum(w * ce) / sum(w)``, a weighted mean, so only the weights' relative sizes matter (a constant
#: weight cancels).
NORMALIZATIONS = ("valid", "weight")


def seg_cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, ignore_index: int = IGNORE_INDEX,
                      pixel_weight: torch.Tensor | None = None, normalize: str = "valid",
                      class_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel cross-entropy over non-ignored pixels, optionally pixel- and class-weighted.

    Args:
        logits: ``(B, C, h, w)``, upsampled here to the target size.
        target: ``(B, H, W)`` class indices (any integer dtype), ``ignore_index`` where unlabelled.
        pixel_weight: optional ``(B, H, W)`` non-negative weights.
        normalize: ``"valid"`` (the loss is ``sum(w * ce) / #valid``) or ``"weight"`` (``sum(w * ce) / sum(w)``),
            see :data:`NORMALIZATIONS`. Without weights both are the plain mean over valid pixels.
        class_weight: optional ``(C,)`` weights of the target classes (multiplied into the pixel weights, as in
            mmsegmentation: with ``normalize="valid"`` a rare class's weight raises its share of the loss).
    Returns:
        a scalar; 0 (with grad) when no pixel is valid.
    """
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"seg_cross_entropy: normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    logits = resize_logits(logits, tuple(target.shape[-2:]))
    target = target.long()
    ce = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
    valid = (target != ignore_index).to(ce.dtype)
    w = valid if pixel_weight is None else valid * pixel_weight.to(ce.dtype)
    if class_weight is not None:
        w = w * class_weight.to(ce.device, ce.dtype)[torch.where(target == ignore_index, 0, target)]
    denom = w.sum() if normalize == "weight" else valid.sum()
    # clamp keeps an all-ignored batch at 0 instead of NaN, without a host-side check.
    return (ce * w).sum() / denom.clamp_min(1e-6)


def ohem_cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, thresh: float = 0.7, min_kept: int = 100_000,
                       ignore_index: int = IGNORE_INDEX, class_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Online hard example mining (OHEM) cross-entropy, as mmsegmentation's ``OHEMPixelSampler``.

    A pixel is hard when the softmax probability of its true class is below the threshold
    ``max(thresh, p_k)``, where ``p_k`` is the ``k``-th smallest true-class probability of the batch and
    ``k = min(min_kept, #valid)``: at least ``min_kept`` of the hardest pixels are kept even when fewer fall below
    ``thresh``. The loss is the (class-weighted) mean over the kept pixels (OhemCrossEntropy of HRNet / DiGA).
    Everything stays on the device (``kthvalue``, no host sync).

    Args:
        logits: ``(B, C, h, w)``; target: ``(B, H, W)``.
        thresh: probability threshold in ``(0, 1]``; min_kept: pixels kept at least (per batch).
    """
    logits = resize_logits(logits, tuple(target.shape[-2:])).float()
    target = target.long()
    valid = target != ignore_index
    safe = torch.where(valid, target, 0)
    with torch.no_grad():
        prob = torch.softmax(logits.detach(), dim=1).gather(1, safe[:, None])[:, 0]  # (B, H, W)
        prob = torch.where(valid, prob, torch.full_like(prob, 2.0))  # ignored pixels sort last
        flat = prob.flatten()
        k = max(1, min(int(min_kept), flat.numel()))
        kth = torch.kthvalue(flat, k).values
        threshold = torch.maximum(kth, torch.tensor(float(thresh), device=flat.device))
        kept = valid & (prob <= threshold)
    ce = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")
    w = kept.to(ce.dtype)
    if class_weight is not None:
        w = w * class_weight.to(ce.device, ce.dtype)[safe]
    return (ce * w).sum() / kept.sum().clamp_min(1)


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
