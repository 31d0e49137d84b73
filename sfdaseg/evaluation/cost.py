"""What a model costs at test time: parameters, GFLOPs and latency of one forward pass.

- **params**: the number of parameters (each shared tensor once), frozen ones included.
- **GFLOPs**: ``1e9`` floating-point operations of one forward at batch 1, counted by
  ``torch.utils.flop_counter.FlopCounterMode``: a multiply-add counts as **2** FLOPs, and only matrix
  products and convolutions (and attention kernels) are counted, not element-wise operations (normalisation,
  activations, resizing), which is the convention of most segmentation papers' GFLOPs columns up to their
  factor 2 (papers that count multiply-adds, "MACs", report half these numbers).
- **latency**: the median wall time of ``repeats`` forward passes at batch 1 after ``warmup`` passes, in
  milliseconds, on the device given, under ``torch.inference_mode`` (and autocast for ``amp`` bf16/fp16). On
  CUDA each pass is bracketed by ``torch.cuda.synchronize``, so the time is that of the kernels, not of their
  launch. A CPU time depends on the thread count, recorded as ``threads``.

The forward is the model's own (logits at ``1 / output_stride``); upsampling to the image size and test-time
augmentation (flip, scales, sliding windows) are not included: a run with ``eval.flip`` costs twice this.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sfdaseg.amp import AMP_DTYPES

__all__ = ["format_cost", "model_cost"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _spent(start: float, budget: float | None) -> bool:
    return budget is not None and time.perf_counter() - start > budget


def model_cost(model: nn.Module, *, size: tuple[int, int], device: torch.device | str | None = None,
               amp: str = "fp32", warmup: int = 5, repeats: int = 20,
               max_time_s: float | None = None) -> dict[str, Any]:
    """Parameters, GFLOPs and latency of one forward of ``model`` on a ``(1, 3, H, W)`` input in ``[0, 1]``.

    Args:
        model: any module taking ``(B, 3, H, W)`` float input (a ``SegmentationModel`` normalises it itself);
            already on ``device``. It runs in eval mode here; its previous mode is restored.
        size: ``(H, W)`` of the input, e.g. the evaluation size after resizing.
        device: where to measure; default the device of the model's first parameter (must be the model's).
        amp: ``"fp32"``, ``"bf16"`` or ``"fp16"`` autocast during the timed passes (FLOPs do not depend on it).
        warmup, repeats: untimed and timed forward passes.
        max_time_s: optional time budget of the warm-up and timed passes together: once it is spent, no more
            passes start (at least one is timed), so a large model on a CPU does not hold an evaluation up for
            minutes. The passes actually timed are returned as ``repeats``.
    Returns:
        ``{"params", "gflops", "latency_ms" (median), "latency_ms_min", "size" [H, W], "batch_size" 1,
        "device", "amp", "threads", "warmup", "repeats"}`` (plain data, JSON-ready).
    """
    if amp not in AMP_DTYPES:
        raise ValueError(f"model_cost: amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"model_cost: expected repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    h, w = (int(v) for v in size)
    if h <= 0 or w <= 0:
        raise ValueError(f"model_cost: size must be a positive (H, W), got {tuple(size)}")
    first = next(iter(model.parameters()), None)
    model_device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device) if device is not None else model_device
    if first is not None and model_device.type != device.type:
        raise ValueError(f"model_cost: the model is on {model_device}, but device={device} was asked for; "
                         "move the model first")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    params = sum(p.numel() for p in model.parameters())
    x = torch.rand(1, 3, h, w, device=device)
    dtype = AMP_DTYPES[amp]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # One untimed pass under the counter: FLOPs are those of the fp32 graph (autocast changes dtypes,
            # not operation counts).
            counter = FlopCounterMode(display=False)
            with counter:
                model(x)
            flops = int(counter.get_total_flops())
        times: list[float] = []
        start = time.perf_counter()
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            for _ in range(warmup):
                if _spent(start, max_time_s):
                    break
                model(x)
            for _ in range(repeats):
                if times and _spent(start, max_time_s):
                    break
                _sync(device)  # wait for earlier work so it is not timed with this pass
                t0 = time.perf_counter()
                model(x)
                _sync(device)  # kernels run asynchronously: the pass ends when the device is done
                times.append((time.perf_counter() - t0) * 1000.0)
    finally:
        model.train(was_training)
    return {
        "params": int(params),
        "gflops": flops / 1e9,
        "latency_ms": float(statistics.median(times)),
        "latency_ms_min": float(min(times)),
        "size": [h, w],
        "batch_size": 1,
        "device": str(device) if device.type != "cuda" else f"{device} ({torch.cuda.get_device_name(device)})",
        "amp": amp,
        "threads": torch.get_num_threads(),
        "warmup": int(warmup),
        "repeats": len(times),
    }


def format_cost(cost: dict[str, Any]) -> str:
    """One line for the evaluation table, e.g. ``params 0.52M | 1.23 GFLOPs at 512x1024 | 12.3 ms (cpu, ...)``."""
    h, w = cost["size"]
    return (f"params {cost['params'] / 1e6:.2f}M | {cost['gflops']:.2f} GFLOPs at {h}x{w} (multiply-add = 2) | "
            f"latency {cost['latency_ms']:.2f} ms (median of {cost['repeats']}, batch 1, {cost['device']}, "
            f"{cost['amp']}, {cost['threads']} threads)")
