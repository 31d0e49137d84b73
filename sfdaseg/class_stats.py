"""Per-class statistics of pseudo-labels as running estimates over many batches and every DDP rank.

Class-balanced selection (CBST percentiles), UniSFDA's per-class certainty percentiles and DUDA's per-class IoU
weights are statistics of a class over the *dataset*. Estimated on one batch of one process they are noise: a
class with 40 pixels in this batch gets a threshold from those 40 pixels, and with one image per process a class
absent from it has no statistic at all. These modules keep the estimate over many batches instead:

- :class:`RunningClassHistogram`: a histogram of a score in ``[0, 1]`` (confidence, certainty) per class,
  ``counts <- momentum * counts + batch_counts``, the batch counts summed over all ranks first, so every rank
  holds the same histogram and gets the same thresholds as one process with the global batch;
- :class:`RunningConfusion`: the same running, all-reduced counts of a confusion between two labelings (true
  positives, predicted and reference pixels per class), for per-class IoU.

Both are ``nn.Module`` s with buffers (saved with the task for a resume) and run on the device with no host
sync: the all-reduce is a collective, not a copy to the host.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["RunningClassHistogram", "RunningConfusion", "all_reduce_sum"]


def all_reduce_sum(t: Tensor) -> Tensor:
    """``t`` summed over every process of the default group (in place), or ``t`` itself without one."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def _buckets(labels: Tensor, num_classes: int) -> Tensor:
    """Class index per pixel, with ``num_classes`` for ignored / out-of-range pixels (a bucket that is dropped)."""
    lab = labels.long().reshape(-1)
    return torch.where((lab >= 0) & (lab < num_classes), lab, num_classes)


class RunningClassHistogram(nn.Module):
    """A running histogram of a score in ``[0, 1]`` per class, and per-class percentile thresholds from it.

    Args:
        num_classes: ``C``.
        bins: histogram resolution (thresholds are bin edges: ``1 / bins`` apart).
        momentum: ``counts <- momentum * counts + batch``; the estimate spans about ``1 / (1 - momentum)``
            batches (0: the current batch only, as a batch-level percentile).

    Buffers: ``counts`` ``(C, bins)`` float32, ``updates`` (number of batches folded in).
    """

    counts: Tensor
    updates: Tensor

    def __init__(self, num_classes: int, *, bins: int = 1000, momentum: float = 0.99) -> None:
        super().__init__()
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"RunningClassHistogram: momentum must be in [0, 1), got {momentum}")
        if int(bins) < 2 or int(num_classes) < 1:
            raise ValueError(f"RunningClassHistogram: expected bins >= 2 and num_classes >= 1, got {bins}, {num_classes}")
        self.num_classes, self.bins, self.momentum = int(num_classes), int(bins), float(momentum)
        self.register_buffer("counts", torch.zeros(self.num_classes, self.bins))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, bins={self.bins}, momentum={self.momentum}"

    @torch.no_grad()
    def update(self, scores: Tensor, labels: Tensor, weight: Tensor | None = None) -> None:
        """Fold one batch in: ``scores`` ``(B, H, W)`` in ``[0, 1]``, ``labels`` ``(B, H, W)`` (ignore allowed),
        optional ``weight`` ``(B, H, W)`` (e.g. 0 on padding). Every rank must call it at the same steps."""
        c, nb = self.num_classes, self.bins
        bucket = _buckets(labels, c)
        b = (scores.detach().float().reshape(-1).clamp(0.0, 1.0) * nb).long().clamp_max(nb - 1)
        index = torch.where(bucket < c, bucket * nb + b, c * nb)  # c * nb: the dropped bucket
        w = torch.ones_like(b, dtype=torch.float32) if weight is None else weight.reshape(-1).float()
        batch = torch.zeros(c * nb + 1, device=scores.device).index_add_(0, index, w)[: c * nb].view(c, nb)
        all_reduce_sum(batch)
        self.counts.mul_(self.momentum).add_(batch)
        self.updates.add_(1)

    def thresholds(self, percentile: float) -> Tensor:
        """``(C,)``: per class, the score above which the top ``percentile`` % of its (running) pixels lie.

        A pixel of class ``c`` with ``score >= thresholds[c]`` is among the top ``percentile`` % of its class
        (ties at the threshold's bin kept). Classes never seen get ``+inf`` (nothing is kept);
        ``percentile`` 100 keeps every pixel, 0 none.
        """
        if not 0.0 <= float(percentile) <= 100.0:
            raise ValueError(f"RunningClassHistogram.thresholds: percentile must be in [0, 100], got {percentile}")
        if float(percentile) == 0.0:
            return torch.full((self.num_classes,), math.inf, device=self.counts.device)
        cdf = self.counts.cumsum(1)  # (C, bins), ascending score
        total = cdf[:, -1:]
        below = (1.0 - float(percentile) / 100.0) * total  # this much mass lies below the threshold
        # The first bin whose cumulative mass exceeds `below`: its lower edge is the threshold.
        first = (cdf <= below * (1 - 1e-6)).sum(1)  # (C,) bins entirely below the threshold
        thr = first.float() / self.bins
        nothing = (total[:, 0] <= 0) | (first >= self.bins)
        return torch.where(nothing, torch.full_like(thr, math.inf), thr)

    def select(self, scores: Tensor, labels: Tensor, *, percentile: float, ignore_index: int = 255
               ) -> tuple[Tensor, Tensor]:
        """Class-balanced selection against the running thresholds: ``(labels with ignore, weight 0/1)``."""
        labels = labels.long()
        valid = (labels >= 0) & (labels < self.num_classes)
        thr = self.thresholds(percentile)[labels.clamp(0, self.num_classes - 1)]
        keep = valid & (scores.float() >= thr)
        return torch.where(keep, labels, ignore_index), keep.float()


class RunningConfusion(nn.Module):
    """Running, all-reduced per-class counts of two labelings (``pred`` against ``ref``) and their IoU.

    Buffers ``tp``, ``n_pred``, ``n_ref`` ``(C,)``: decayed by ``momentum`` at each update, then the batch's
    counts (summed over ranks) added.
    """

    tp: Tensor
    n_pred: Tensor
    n_ref: Tensor

    def __init__(self, num_classes: int, *, momentum: float = 0.99) -> None:
        super().__init__()
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError(f"RunningConfusion: momentum must be in [0, 1), got {momentum}")
        self.num_classes, self.momentum = int(num_classes), float(momentum)
        for name in ("tp", "n_pred", "n_ref"):
            self.register_buffer(name, torch.zeros(self.num_classes))

    @torch.no_grad()
    def update(self, pred: Tensor, ref: Tensor) -> None:
        """``pred``, ``ref`` ``(B, H, W)``; pixels where ``ref`` is ignored (or out of range) are not counted."""
        c = self.num_classes
        r = _buckets(ref, c)
        p = torch.where(r < c, _buckets(pred, c), c)
        ones = torch.ones_like(r, dtype=torch.float32)
        counts = torch.zeros(3, c + 1, device=pred.device)
        counts[0].index_add_(0, torch.where(p == r, r, c), ones)
        counts[1].index_add_(0, p, ones)
        counts[2].index_add_(0, r, ones)
        counts = all_reduce_sum(counts[:, :c].contiguous())
        for buf, batch in zip((self.tp, self.n_pred, self.n_ref), counts):
            buf.mul_(self.momentum).add_(batch)

    def iou(self) -> Tensor:
        """``(C,)`` running IoU in ``[0, 1]`` (0 for classes never seen)."""
        return self.tp / (self.n_pred + self.n_ref - self.tp).clamp_min(1e-6)
