"""Confusion matrix on the device and the segmentation metrics derived from it.

Units: every score (IoU, mIoU, pixel accuracy) is a **percentage in [0, 100]**, as the papers report them.
Cityscapes' own tool reports fractions; multiply those by 100 to compare.

Protocols (16 and 13 classes for SYNTHIA -> Cityscapes) only choose which classes enter the mean. Each IoU
is still computed from the full confusion matrix of the model's classes, exactly as the official Cityscapes
tool does when it is given a 19-class prediction: a pixel of class ``k`` predicted as an excluded class
(terrain, truck, train) is a false negative of ``k``, and a pixel of an excluded class predicted as ``k`` is
a false positive of ``k``. Only the averaging changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from sfdaseg.data.classes import IGNORE_INDEX, PROTOCOLS

__all__ = ["ConfusionMatrix", "SegMetrics", "resolve_protocol"]


@dataclass
class SegMetrics:
    """Scores of one evaluation; all scores in percent (0-100).

    Attributes:
        miou: mean IoU over the protocol's classes that occur (in labels or predictions); NaN if none does.
        per_class_iou: class name -> IoU, for the protocol's classes in class-index order; NaN for a class
            with no labelled and no predicted pixel (it is left out of ``miou``).
        pixel_accuracy: correct / labelled pixels, over all non-ignored pixels (every class, not only the
            protocol's); NaN when no pixel was labelled.
        protocol: number of classes averaged when a protocol was given, else ``None`` (all classes).
        num_images: images seen (summed over processes after ``ConfusionMatrix.all_reduce``).
        num_classes: number of classes of the model (size of the confusion matrix).
    """

    miou: float
    per_class_iou: dict[str, float]
    pixel_accuracy: float
    protocol: int | None
    num_images: int
    num_classes: int = 0

    def to_dict(self) -> dict:
        """A JSON-ready dict (NaN becomes ``None``, so ``json.dumps(..., allow_nan=False)`` works)."""
        return {
            "miou": _json_float(self.miou),
            "per_class_iou": {k: _json_float(v) for k, v in self.per_class_iou.items()},
            "pixel_accuracy": _json_float(self.pixel_accuracy),
            "protocol": self.protocol,
            "num_images": self.num_images,
            "num_classes": self.num_classes,
            "units": "percent",
        }

    def format_table(self) -> str:
        """A plain-text table: one row per class (IoU in %), then the mean and the pixel accuracy."""
        width = max([len("class"), len("pixel accuracy"), *(len(k) for k in self.per_class_iou)])
        label = f"mIoU ({len(self.per_class_iou)} classes)"
        width = max(width, len(label))
        rule = "-" * (width + 10)
        lines = [f"{'class':<{width}}   IoU (%)", rule]
        lines += [f"{name:<{width}}  {_fmt(v):>8}" for name, v in self.per_class_iou.items()]
        lines += [
            rule,
            f"{label:<{width}}  {_fmt(self.miou):>8}",
            f"{'pixel accuracy':<{width}}  {_fmt(self.pixel_accuracy):>8}",
        ]
        return "\n".join(lines)


def _json_float(v: float) -> float | None:
    return None if math.isnan(v) else float(v)


def _fmt(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{v:.2f}"


def resolve_protocol(protocol: int | Sequence[int] | None, num_classes: int) -> tuple[int, ...] | None:
    """Class indices that enter the mean: ``None`` (all), a key of ``PROTOCOLS`` (19/16/13) or explicit indices.

    A ``PROTOCOLS`` key names a subset of the 19 Cityscapes trainIds, so it needs a 19-class model.
    """
    if protocol is None:
        return None
    if isinstance(protocol, int):
        if isinstance(protocol, bool) or protocol not in PROTOCOLS:
            raise ValueError(
                f"protocol: expected one of {sorted(PROTOCOLS)} or a list of class indices, got {protocol!r}"
            )
        if num_classes != 19:
            raise ValueError(
                f"protocol={protocol}: the {protocol}-class protocol picks Cityscapes trainIds and needs a "
                f"19-class model, got num_classes={num_classes}"
            )
        return PROTOCOLS[protocol]
    ids = tuple(int(i) for i in protocol)
    if not ids or len(set(ids)) != len(ids) or not all(0 <= i < num_classes for i in ids):
        raise ValueError(
            f"protocol: expected distinct class indices in 0..{num_classes - 1}, got {list(protocol)}"
        )
    return ids


class ConfusionMatrix:
    """Pixel confusion counts accumulated on the device, reduced across processes once.

    ``mat[t, p]`` (int64, shape ``(C, C + 1)``) counts labelled pixels of true class ``t`` predicted as ``p``.
    The extra last column counts predictions outside ``0..C-1`` (for example 255 in a prediction read from
    disk): such a pixel is a false negative of its true class and a false positive of no class, as in the
    official Cityscapes tool. Pixels whose target is ``ignore_index`` or outside ``0..C-1`` are not counted.

    Use: ``update`` per batch, ``all_reduce`` once after the last batch, then ``compute``.
    """

    def __init__(self, num_classes: int, *, ignore_index: int = IGNORE_INDEX, device: torch.device | str | None = None):
        if num_classes < 1:
            raise ValueError(f"num_classes: expected a positive integer, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.mat = torch.zeros(self.num_classes, self.num_classes + 1, dtype=torch.int64, device=self.device)
        self.num_images = 0
        self._reduced = False

    def reset(self) -> None:
        self.mat.zero_()
        self.num_images = 0
        self._reduced = False

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch. ``pred`` and ``target``: integer tensors of one shape, ``(B, H, W)`` (or ``(H, W)``).

        No host sync: invalid pixels are routed to a spare bin with ``torch.where`` instead of a boolean
        index (which would read the number of kept pixels back to the host).
        """
        if pred.shape != target.shape:
            raise ValueError(
                f"ConfusionMatrix.update: pred and target must have the same shape, got {tuple(pred.shape)} "
                f"and {tuple(target.shape)}"
            )
        if pred.is_floating_point() or target.is_floating_point() or pred.is_complex() or target.is_complex():
            raise TypeError(
                f"ConfusionMatrix.update: expected integer class-index tensors, got {pred.dtype} and {target.dtype} "
                "(take the argmax of the logits first)"
            )
        n = self.num_classes
        t = target.to(self.device, non_blocking=True).long().reshape(-1)
        p = pred.to(self.device, non_blocking=True).long().reshape(-1)
        t_ok = (t >= 0) & (t < n) & (t != self.ignore_index)
        p = torch.where((p >= 0) & (p < n), p, n)  # out-of-range prediction -> extra column
        spare = n * (n + 1)
        idx = torch.where(t_ok, t * (n + 1) + p, spare)
        self.mat += _histogram(idx, spare + 1)[:spare].view(n, n + 1)
        self.num_images += int(pred.shape[0]) if pred.dim() >= 3 else 1

    def all_reduce(self) -> None:
        """Sum the counts (and image counts) over all processes: one collective; no-op without a process group."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        if self._reduced:
            raise RuntimeError("ConfusionMatrix.all_reduce: already reduced; call reset() before accumulating again")
        # The image count rides along in the same tensor so that one collective suffices.
        buf = torch.cat([self.mat.reshape(-1), self.mat.new_tensor([self.num_images])])
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        self.mat.copy_(buf[:-1].view_as(self.mat))
        self.num_images = int(buf[-1])
        self._reduced = True

    def compute(
        self,
        *,
        protocol: int | Sequence[int] | None = None,
        class_names: Sequence[str] | None = None,
    ) -> SegMetrics:
        """Scores in percent. ``protocol``: see ``resolve_protocol``; ``class_names`` default to ``"0".."C-1"``."""
        n = self.num_classes
        ids = resolve_protocol(protocol, n)
        names = [str(i) for i in range(n)] if class_names is None else [str(c) for c in class_names]
        if len(names) != n:
            raise ValueError(f"class_names: expected {n} names (one per class), got {len(names)}")
        m = self.mat.detach().to("cpu", torch.float64)  # one copy at the end; float64 is exact to 2**53 pixels
        tp = m.diagonal()
        fn = m.sum(1) - tp  # the extra column is a miss of the true class
        fp = m[:, :n].sum(0) - tp
        denom = tp + fp + fn
        iou = torch.where(denom > 0, tp / denom.clamp_min(1), torch.full_like(tp, math.nan)) * 100.0
        chosen = list(range(n)) if ids is None else list(ids)
        sel = iou[chosen]
        present = ~torch.isnan(sel)
        miou = float(sel[present].mean()) if bool(present.any()) else math.nan
        labelled = m.sum()
        pixel_accuracy = float(tp.sum() / labelled * 100.0) if labelled > 0 else math.nan
        return SegMetrics(
            miou=miou,
            per_class_iou={names[i]: float(iou[i]) for i in chosen},
            pixel_accuracy=pixel_accuracy,
            protocol=None if ids is None else len(ids),
            num_images=self.num_images,
            num_classes=n,
        )


def _histogram(idx: torch.Tensor, size: int, *, sync_free: bool | None = None) -> torch.Tensor:
    """Counts of ``idx`` (int64, values in ``0..size-1``) as an int64 tensor of length ``size``.

    ``torch.bincount`` on CUDA reads ``idx.max()`` (and ``idx.min()``) back to the host to size its output,
    a sync per batch; an ``index_add_`` into the fixed-size result needs none. Integer atomics are exact, so
    the counts do not depend on the order. Elsewhere (CPU) bincount is the fast path. ``sync_free`` forces
    the choice (default: the index_add path on CUDA only).
    """
    if sync_free is None:
        sync_free = idx.is_cuda
    if sync_free:
        out = torch.zeros(size, dtype=torch.int64, device=idx.device)
        return out.index_add_(0, idx, torch.ones_like(idx))
    return torch.bincount(idx, minlength=size)
