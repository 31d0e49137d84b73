"""Test-time inference: whole image or sliding window, optional horizontal flip and multi-scale.

The result is the **average of softmax probabilities** over the test-time views (flip, scales), the
standard way to combine them; within one view, overlapping sliding windows average their logits (each window's
logits are upsampled to the crop size first). Probabilities keep the argmax of a single plain view unchanged.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sfdaseg.amp import AMP_DTYPES

__all__ = ["predict_logits", "predict"]

MODES = ("whole", "slide")


def _pair(v: int | Sequence[int] | None, name: str) -> tuple[int, int] | None:
    if v is None:
        return None
    if isinstance(v, int):
        v = (v, v)
    v = tuple(int(x) for x in v)
    if len(v) != 2 or min(v) < 1:
        raise ValueError(f"{name}: expected a positive int or (height, width), got {v}")
    return v  # type: ignore[return-value]


def autocast_context(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``amp`` in ``"bf16"``/``"fp16"``; a no-op for ``"fp32"``."""
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp: expected one of {sorted(AMP_DTYPES)}, got {amp!r}")
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != x.shape[0]:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TypeError(
            f"model(x) must return logits of shape (B, C, h, w) for x of shape {tuple(x.shape)}, got {got}"
        )
    return out.float()  # autocast may give bf16/fp16: accumulate in fp32


def _whole(model: nn.Module, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Logits ``(B, C, *size)`` (default the input size) from one forward pass, upsampled bilinearly once."""
    logits = _forward(model, x)
    size = tuple(x.shape[-2:]) if size is None else size
    if tuple(logits.shape[-2:]) != size:
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits


def _starts(size: int, crop: int, stride: int) -> list[int]:
    """Starts of ``crop``-long windows every ``stride`` covering ``0..size-1`` (``size >= crop >= stride``).

    The last window ends exactly at ``size``.
    """
    last = size - crop
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return starts


def _slide(
    model: nn.Module, x: torch.Tensor, crop: tuple[int, int], stride: tuple[int, int], window_batch: int
) -> torch.Tensor:
    """Logits ``(B, C, H, W)`` averaged over overlapping ``crop`` windows placed every ``stride`` pixels.

    An image smaller than the crop is zero-padded (bottom/right) to the crop size, so the model always sees
    windows of the size it was trained on; the padding is cropped off the result.
    """
    b, _, h, w = x.shape
    ch, cw = crop
    sh, sw = stride
    ph, pw = max(h, ch), max(w, cw)
    if (ph, pw) != (h, w):
        x = F.pad(x, (0, pw - w, 0, ph - h), value=0.0)
    boxes = [(y, xx) for y in _starts(ph, ch, sh) for xx in _starts(pw, cw, sw)]
    # Crops of every image for every window: (len(boxes) * B, 3, ch, cw), window-major.
    crops = torch.cat([x[:, :, y : y + ch, xx : xx + cw] for y, xx in boxes])
    logits_sum: torch.Tensor | None = None
    count = torch.zeros(1, 1, ph, pw, device=x.device)
    for i in range(0, crops.shape[0], window_batch):
        out = _whole(model, crops[i : i + window_batch])  # (n, C, ch, cw)
        if logits_sum is None:
            logits_sum = x.new_zeros(b, out.shape[1], ph, pw, dtype=torch.float32)
        for j in range(out.shape[0]):
            k = i + j
            y, xx = boxes[k // b]
            logits_sum[k % b, :, y : y + ch, xx : xx + cw] += out[j]
    for y, xx in boxes:
        count[:, :, y : y + ch, xx : xx + cw] += 1
    assert logits_sum is not None
    return (logits_sum / count)[:, :, :h, :w]


@torch.inference_mode()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    *,
    mode: str = "whole",
    crop: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
    output_size: Sequence[int] | None = None,
    amp: str = "fp32",
    window_batch: int = 8,
) -> torch.Tensor:
    """Class probabilities ``(B, C, Ho, Wo)`` (float32, softmax averaged over flip and scales).

    Despite the name (kept for the callers' contract) the result is probabilities, not raw logits: that is
    what test-time augmentation averages. The argmax is the prediction.

    Args:
        model: maps ``(B, 3, h, w)`` float RGB in ``[0, 1]`` to logits ``(B, C, h/s, w/s)``; call ``model.eval()``
            first (``evaluate`` does).
        images: ``(B, 3, H, W)`` float RGB in ``[0, 1]`` (``uint8`` is accepted and divided by 255).
        mode: ``"whole"`` (one forward per view, logits upsampled bilinearly) or ``"slide"`` (windows of ``crop``
            every ``stride`` pixels, batched ``window_batch`` crops per forward).
        crop: window size ``(h, w)`` or an int, required for ``"slide"``.
        stride: window step; default two thirds of the crop.
        flip: also run the horizontally flipped image and average.
        scales: resize factors of the input (bilinear); every scale's output is resized to ``output_size``.
        output_size: ``(Ho, Wo)``; default the input size ``(H, W)``.
        amp: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast for the forward passes only).
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected a (B, 3, H, W) tensor, got shape {tuple(images.shape)}")
    crop_hw = _pair(crop, "crop")
    stride_hw = _pair(stride, "stride")
    if mode == "slide":
        if crop_hw is None:
            raise ValueError("crop: sliding-window inference (mode='slide') needs a crop size (h, w)")
        if stride_hw is None:
            stride_hw = (max(1, crop_hw[0] * 2 // 3), max(1, crop_hw[1] * 2 // 3))
        if stride_hw[0] > crop_hw[0] or stride_hw[1] > crop_hw[1]:
            raise ValueError(f"stride: must not exceed the crop {crop_hw} (windows would leave gaps), got {stride_hw}")
    if window_batch < 1:
        raise ValueError(f"window_batch: expected a positive int, got {window_batch}")
    scales = tuple(float(s) for s in scales)
    if not scales or min(scales) <= 0:
        raise ValueError(f"scales: expected positive resize factors, got {list(scales)}")
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    h, w = x.shape[-2:]
    out_hw = (h, w) if output_size is None else tuple(int(v) for v in output_size)
    if len(out_hw) != 2 or min(out_hw) < 1:
        raise ValueError(f"output_size: expected (height, width), got {output_size}")

    def run(view: torch.Tensor) -> torch.Tensor:
        with autocast_context(amp, view.device):
            if mode == "whole":  # straight from the model's stride to the output size: one interpolation
                return _whole(model, view, out_hw)
            return _slide(model, view, crop_hw, stride_hw, window_batch)  # type: ignore[arg-type]

    probs: torch.Tensor | None = None
    views = 0
    for s in scales:
        xs = x
        if s != 1.0:
            size = (max(1, round(h * s)), max(1, round(w * s)))
            xs = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        for flipped in (False, True) if flip else (False,):
            logits = run(xs.flip(-1)).flip(-1) if flipped else run(xs)
            if tuple(logits.shape[-2:]) != out_hw:
                logits = F.interpolate(logits, size=out_hw, mode="bilinear", align_corners=False)
            p = logits.softmax(dim=1)
            probs = p if probs is None else probs.add_(p)
            views += 1
    assert probs is not None
    return probs / views if views > 1 else probs


@torch.inference_mode()
def predict(model: nn.Module, images: torch.Tensor, **kwargs) -> torch.Tensor:
    """Class indices ``(B, Ho, Wo)`` (int64): the argmax of ``predict_logits(model, images, **kwargs)``."""
    return predict_logits(model, images, **kwargs).argmax(dim=1)
