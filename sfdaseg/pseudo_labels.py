"""Pseudo-labels from a teacher's predictions: confidence, selection policies, class prototypes, statistics.

Everything here runs on the device inside the training step: no ``.item()``, no ``.cpu()``, no boolean-mask
indexing with a data-dependent output shape and no Python branch on tensor values, so nothing waits for the
GPU.

Every selection / weighting policy maps ``(conf, label)`` to ``(label, weight)``:

* ``conf`` ``(B, H, W)`` float: the teacher's confidence (max softmax probability);
* ``label`` ``(B, H, W)`` long: the teacher's argmax (``ignore_index`` allowed, e.g. crop padding);
* the returned ``label`` is ``label`` with ``ignore_index`` where the policy drops a pixel, and ``weight``
  ``(B, H, W)`` float in ``[0, 1]`` is the pixel's loss weight. In every policy the weight is 0 wherever the
  returned label is ``ignore_index``. The recipes normalise the weighted loss over the labelled pixels
  (``seg_cross_entropy(normalize="valid")``): a 0/1 selection gives the mean over the kept pixels and the
  confidence-ratio weight scales the loss, as in DAFormer.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "POLICIES",
    "PrototypeMemory",
    "bilateral_consensus",
    "confidence_ratio_weight",
    "pseudo_label_stats",
    "select_class_balanced",
    "select_none",
    "select_pseudo_labels",
    "select_threshold",
    "softmax_confidence",
]

IGNORE_INDEX = 255


def softmax_confidence(logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax probabilities, confidence and label of logits (computed in float32).

    Args:
        logits: ``(B, C, H, W)`` (any float dtype).
    Returns:
        ``probs`` ``(B, C, H, W)`` float32, ``conf`` = max probability ``(B, H, W)`` float32 and ``label`` =
        argmax ``(B, H, W)`` long.
    """
    if logits.dim() != 4:
        raise ValueError(f"softmax_confidence: expected logits of shape (B, C, H, W), got {tuple(logits.shape)}")
    probs = torch.softmax(logits.float(), dim=1)
    conf, label = probs.max(dim=1)
    return probs, conf, label


def _check_pair(conf: Tensor, label: Tensor, what: str) -> None:
    if conf.shape != label.shape or conf.dim() != 3:
        raise ValueError(
            f"{what}: expected conf and label of the same shape (B, H, W), got {tuple(conf.shape)} and "
            f"{tuple(label.shape)}"
        )
    if label.is_floating_point():
        raise TypeError(f"{what}: label must be an integer tensor, got {label.dtype}")


def select_threshold(conf: Tensor, label: Tensor, *, tau: float, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Fixed confidence threshold: pixels with ``conf < tau`` become ``ignore_index``; weight 1 on kept pixels.

    Args:
        conf: ``(B, H, W)`` float; label: ``(B, H, W)`` integer.
    Returns:
        ``label`` ``(B, H, W)`` long, ``weight`` ``(B, H, W)`` float32 (1 kept, 0 dropped).
    """
    _check_pair(conf, label, "select_threshold")
    label = label.long()
    keep = (conf >= tau) & (label != ignore_index)
    return torch.where(keep, label, ignore_index), keep.float()


def select_class_balanced(
    conf: Tensor,
    label: Tensor,
    *,
    num_classes: int,
    percentile: float,
    ignore_index: int = IGNORE_INDEX,
    tau_max: float | None = None,
    max_samples: int = 1 << 22,
) -> tuple[Tensor, Tensor]:
    """Class-balanced selection (CBST, Zou et al. 2018): the top ``percentile`` % most confident pixels per class.

    For each class ``c`` the threshold ``t_c`` is the confidence at rank ``floor((1 - p/100) * n_c)`` (ascending)
    among the ``n_c`` pixels of the batch predicted as ``c``, i.e. the ``(100 - p)``-th percentile; pixels with
    ``conf >= t_c`` are kept (about ``p`` % of each class, ties included). A frequent, confident class (road) and a
    rare, uncertain one (a traffic sign) thus keep the same share, where one global threshold would drop the
    rare class entirely. Classes without pixels keep nothing; ``tau_max`` caps every threshold (a pixel with
    ``conf >= tau_max`` is always kept); ``percentile=0`` keeps nothing, 100 keeps everything.

    All classes at once: the pixels are sorted by (class, confidence) with two stable sorts, so the cost is one
    sort of ``B * H * W`` values and no Python loop over classes. When there are more than ``max_samples`` pixels
    the thresholds are estimated on every ``k``-th pixel (a fixed stride), which bounds memory.

    Args:
        conf: ``(B, H, W)`` float; label: ``(B, H, W)`` integer in ``[0, num_classes)`` or ``ignore_index``.
    Returns:
        ``label`` ``(B, H, W)`` long (``ignore_index`` where dropped) and ``weight`` ``(B, H, W)`` float32 (1/0).
    """
    _check_pair(conf, label, "select_class_balanced")
    if not 0.0 <= float(percentile) <= 100.0:
        raise ValueError(f"select_class_balanced: percentile must be in [0, 100], got {percentile}")
    label = label.long()
    c = int(num_classes)
    valid = (label >= 0) & (label < c)
    # Class id per pixel with one extra bucket (c) for ignored / out-of-range pixels, so that no pixel is
    # removed (which would give a data-dependent shape).
    bucket = torch.where(valid, label, c).reshape(-1)
    values = conf.detach().float().reshape(-1)
    n = values.numel()
    if n > max_samples:
        stride = math.ceil(n / max_samples)  # from shapes only: no sync
        bucket, values = bucket[::stride], values[::stride]
    # Sort by confidence, then stably by class: pixels of each class end up contiguous and in ascending order.
    values, order = torch.sort(values, stable=True)
    bucket = bucket[order]
    bucket, order = torch.sort(bucket, stable=True)
    values = values[order]
    counts = torch.zeros(c + 1, dtype=torch.long, device=conf.device)
    counts.index_add_(0, bucket, torch.ones_like(bucket))
    counts = counts[:c]
    starts = torch.cumsum(counts, 0) - counts  # (C,) first sorted position of each class
    frac = 1.0 - float(percentile) / 100.0
    rank = torch.floor(counts.double() * frac).long()  # (C,) in [0, n_c]
    index = (starts + torch.minimum(rank, (counts - 1).clamp(min=0))).clamp(0, max(values.numel() - 1, 0))
    thresholds = values[index] if values.numel() else torch.zeros(c, device=conf.device)
    # rank == n_c happens for percentile 0 (keep nothing); classes without pixels keep nothing either.
    nothing = (counts == 0) | (rank >= counts)
    thresholds = torch.where(nothing, torch.full_like(thresholds, math.inf), thresholds)
    if tau_max is not None:
        thresholds = thresholds.clamp(max=float(tau_max))
    thr_pixel = thresholds[label.clamp(0, c - 1)]  # (B, H, W)
    keep = valid & (conf.float() >= thr_pixel)
    return torch.where(keep, label, ignore_index), keep.float()


def confidence_ratio_weight(conf: Tensor, label: Tensor, *, tau: float, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """DAFormer's confidence-ratio weight: every pixel kept, weighted by its image's share of confident pixels.

    ``weight[b] = #{conf > tau} / #{valid pixels}`` of image ``b`` (valid = label not ``ignore_index``), broadcast
    to the image's pixels, 0 on ignored pixels. DAFormer computes one ratio for the whole batch; the per-image
    ratio keeps an image the teacher is unsure of from borrowing the confidence of another.

    Returns:
        ``label`` ``(B, H, W)`` long (unchanged) and ``weight`` ``(B, H, W)`` float32 in ``[0, 1]``.
    """
    _check_pair(conf, label, "confidence_ratio_weight")
    label = label.long()
    valid = (label != ignore_index).float()
    confident = (conf > tau).float() * valid
    ratio = confident.flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1.0)  # (B,)
    return label, ratio[:, None, None] * valid


def select_none(conf: Tensor, label: Tensor, *, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """No selection: every pixel kept with weight 1 (0 only where ``label`` already is ``ignore_index``)."""
    _check_pair(conf, label, "select_none")
    label = label.long()
    return label, (label != ignore_index).float()


#: name -> policy. ``select_pseudo_labels`` calls them with the keyword arguments each one takes.
POLICIES: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "ratio": confidence_ratio_weight,
    "threshold": select_threshold,
    "class_balanced": select_class_balanced,
    "none": select_none,
}


def select_pseudo_labels(
    policy: str,
    conf: Tensor,
    label: Tensor,
    *,
    num_classes: int,
    tau: float = 0.968,
    percentile: float = 50.0,
    ignore_index: int = IGNORE_INDEX,
    tau_max: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Apply the policy named ``policy`` (a key of :data:`POLICIES`) and return ``(label, weight)``.

    ``tau`` is used by ``"ratio"`` and ``"threshold"``; ``percentile`` (and ``tau_max``) by ``"class_balanced"``.
    """
    if policy == "ratio":
        return confidence_ratio_weight(conf, label, tau=tau, ignore_index=ignore_index)
    if policy == "threshold":
        return select_threshold(conf, label, tau=tau, ignore_index=ignore_index)
    if policy == "class_balanced":
        return select_class_balanced(conf, label, num_classes=num_classes, percentile=percentile,
                                     ignore_index=ignore_index, tau_max=tau_max)
    if policy == "none":
        return select_none(conf, label, ignore_index=ignore_index)
    raise ValueError(f"unknown pseudo-label policy {policy!r}; choices: {', '.join(POLICIES)}")


# --------------------------------------------------------------------------------------------------------------
# Class prototypes
# --------------------------------------------------------------------------------------------------------------

METRICS = ("cosine", "euclidean")


class PrototypeMemory(nn.Module):
    """Per-class feature centroids updated by momentum, and nearest-centroid labels (DiGA, STvM).

    Args:
        num_classes: ``C``.
        dim: feature dimension ``D``.
        momentum: weight of the batch mean in ``c <- (1 - momentum) * c + momentum * batch_mean`` (DiGA: 1e-4).
        metric: ``"cosine"`` (similarity of L2-normalised vectors) or ``"euclidean"`` (negative squared distance).
        sync_distributed: when ``torch.distributed`` is initialised with more than one process, the per-class
            batch sums are all-reduced so that every rank keeps the same centroids. Every rank must then call
            :meth:`update` at the same steps (the training step does).

    Buffers (persistent: they are saved in ``state_dict`` and checkpoints):
        centroids: ``(C, D)`` float32.
        initialized: ``(C,)`` bool; a class becomes initialised the first time it appears in a batch, and its
            centroid is then that batch's mean (a running mean starting from zeros would take ~1/momentum steps
            to mean anything).
    """

    centroids: Tensor
    initialized: Tensor

    def __init__(self, num_classes: int, dim: int, *, momentum: float = 1e-4, metric: str = "cosine",
                 sync_distributed: bool = True) -> None:
        super().__init__()
        if metric not in METRICS:
            raise ValueError(f"PrototypeMemory: metric must be one of {', '.join(METRICS)}, got {metric!r}")
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"PrototypeMemory: momentum must be in [0, 1], got {momentum}")
        if int(num_classes) < 1 or int(dim) < 1:
            raise ValueError(f"PrototypeMemory: num_classes and dim must be positive, got {num_classes}, {dim}")
        self.num_classes = int(num_classes)
        self.dim = int(dim)
        self.momentum = float(momentum)
        self.metric = metric
        self.sync_distributed = bool(sync_distributed)
        self.register_buffer("centroids", torch.zeros(self.num_classes, self.dim, dtype=torch.float32))
        self.register_buffer("initialized", torch.zeros(self.num_classes, dtype=torch.bool))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}, momentum={self.momentum}, metric={self.metric!r}"

    def _check_features(self, features: Tensor, what: str) -> None:
        if features.dim() != 4 or features.shape[1] != self.dim:
            raise ValueError(
                f"PrototypeMemory.{what}: expected features of shape (B, {self.dim}, h, w), got {tuple(features.shape)}"
            )

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        """Fold one batch into the centroids.

        Args:
            features: ``(B, D, h, w)`` (any float dtype; averaged in float32).
            labels: ``(B, h, w)`` integer, ``[0, C)`` or ignore (any other value is ignored). Labels of another
                size are resized to ``(h, w)`` by nearest neighbour first.

        Per class: the mean of the batch features labelled with it (one ``index_add_``); a class seen for the first
        time takes that mean, an initialised class moves by ``momentum`` towards it, a class absent from the
        batch is unchanged.
        """
        self._check_features(features, "update")
        if labels.dim() != 3 or labels.shape[0] != features.shape[0]:
            raise ValueError(
                f"PrototypeMemory.update: expected labels of shape (B, h, w) with B={features.shape[0]}, "
                f"got {tuple(labels.shape)}"
            )
        if labels.shape[-2:] != features.shape[-2:]:
            labels = F.interpolate(labels[:, None].float(), size=features.shape[-2:], mode="nearest")[:, 0]
        c, d = self.num_classes, self.dim
        labels = labels.long().reshape(-1)
        bucket = torch.where((labels >= 0) & (labels < c), labels, c)  # (N,), c = the ignored bucket
        f = features.detach().float().permute(0, 2, 3, 1).reshape(-1, d)  # (N, D)
        # One index_add_ of [features, 1] gives the per-class sums and counts together.
        ones = torch.ones(f.shape[0], 1, dtype=f.dtype, device=f.device)
        sums = torch.zeros(c + 1, d + 1, dtype=torch.float32, device=f.device)
        sums.index_add_(0, bucket, torch.cat([f, ones], dim=1))
        if self.sync_distributed and torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(sums)
        counts = sums[:c, d]  # (C,)
        mean = sums[:c, :d] / counts.clamp_min(1.0)[:, None]  # (C, D)
        present = counts > 0
        cen = self.centroids
        moved = torch.where(self.initialized[:, None], (1.0 - self.momentum) * cen + self.momentum * mean, mean)
        cen.copy_(torch.where(present[:, None], moved, cen))
        self.initialized.logical_or_(present)

    @torch.no_grad()
    def update_per_image(self, features: Tensor, labels: Tensor, *, min_pixels: int = 5) -> None:
        """DiGA's update: one momentum step per image and class, in batch order (then rank order under DDP).

        For image ``b`` and each class ``c`` with at least ``min_pixels`` pixels labelled ``c``, the centroid
        moves by ``momentum`` towards that image's class mean; a class seen for the first time takes the mean. Under
        DDP the per-image means of every rank are gathered first, so all ranks apply the same sequence.

        Args:
            features: ``(B, D, h, w)``; labels: ``(B, h, w)`` (resized by nearest neighbour when another size).
        """
        self._check_features(features, "update_per_image")
        if labels.shape[-2:] != features.shape[-2:]:
            labels = F.interpolate(labels[:, None].float(), size=features.shape[-2:], mode="nearest")[:, 0]
        c, d = self.num_classes, self.dim
        b = features.shape[0]
        lab = labels.long().reshape(b, -1)
        bucket = torch.where((lab >= 0) & (lab < c), lab, c)  # (B, N)
        f = features.detach().float().permute(0, 2, 3, 1).reshape(b, -1, d)  # (B, N, D)
        ones = torch.ones(b, f.shape[1], 1, dtype=f.dtype, device=f.device)
        sums = torch.zeros(b, c + 1, d + 1, device=f.device).scatter_add_(
            1, bucket[..., None].expand(-1, -1, d + 1), torch.cat([f, ones], dim=2))[:, :c]  # (B, C, D + 1)
        if self.sync_distributed and torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            gathered = [torch.empty_like(sums) for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather(gathered, sums.contiguous())
            sums = torch.cat(gathered)  # (world * B, C, D + 1), rank order
        cen = self.centroids
        for per_image in sums:  # a short loop over images (no host sync): DiGA's order of updates
            counts = per_image[:, d]
            mean = per_image[:, :d] / counts.clamp_min(1.0)[:, None]
            present = counts >= min_pixels
            moved = torch.where(self.initialized[:, None], (1.0 - self.momentum) * cen + self.momentum * mean, mean)
            cen.copy_(torch.where(present[:, None], moved, cen))
            self.initialized.logical_or_(present)

    def similarity(self, features: Tensor) -> Tensor:
        """Similarity of every pixel to every centroid: ``(B, D, h, w)`` -> ``(B, C, h, w)`` float32.

        Cosine similarity, or the negative squared euclidean distance (higher = closer in both cases). The values
        of uninitialised classes are computed like the others (against a zero centroid); :meth:`nearest` masks them.
        """
        self._check_features(features, "similarity")
        # float32 even under autocast: bf16 dot products of normalised vectors cannot tell close centroids apart.
        with torch.autocast(device_type=features.device.type, enabled=False):
            f = features.float()
            cen = self.centroids.float()
            if self.metric == "cosine":
                return torch.einsum("bdhw,cd->bchw", F.normalize(f, dim=1), F.normalize(cen, dim=1))
            dot = torch.einsum("bdhw,cd->bchw", f, cen)
            return 2.0 * dot - (f * f).sum(1, keepdim=True) - (cen * cen).sum(1)[None, :, None, None]

    def nearest(self, features: Tensor, *, ignore_index: int = IGNORE_INDEX) -> Tensor:
        """Nearest-centroid label of every pixel: ``(B, D, h, w)`` -> ``(B, h, w)`` long.

        Uninitialised classes are never chosen; while no class is initialised every pixel is ``ignore_index``.
        """
        sim = self.similarity(features)
        sim = sim.masked_fill(~self.initialized[None, :, None, None], -math.inf)
        label = sim.argmax(dim=1)
        return torch.where(self.initialized.any(), label, ignore_index)


def bilateral_consensus(offline_label: Tensor, proto_label: Tensor, *, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """DiGA's threshold-free consensus: the offline label where it equals the prototype label, else ignore.

    Args:
        offline_label: ``(B, H, W)`` integer (e.g. uint8 from the offline cache, 255 = ignore).
        proto_label: ``(B, H, W)`` integer, the nearest-centroid label at the same size.
    Returns:
        ``(B, H, W)`` long.
    """
    if offline_label.shape != proto_label.shape:
        raise ValueError(
            f"bilateral_consensus: offline and prototype labels differ in shape: {tuple(offline_label.shape)} "
            f"vs {tuple(proto_label.shape)} (upsample the prototype label to the offline label's size)"
        )
    off = offline_label.long()
    return torch.where(off == proto_label.long(), off, ignore_index)


def pseudo_label_stats(
    label: Tensor,
    conf: Tensor | None,
    *,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, Tensor]:
    """Device-side statistics of a pseudo-label batch (read once per log interval by the trainer).

    Args:
        label: ``(B, H, W)`` integer, ``ignore_index`` where dropped.
        conf: ``(B, H, W)`` confidence, or None (then ``mean_conf`` is left out).
    Returns:
        ``kept_frac`` (scalar: share of pixels not ignored), ``mean_conf`` (scalar: mean confidence of the kept
        pixels, 0 when none), ``class_hist`` ``(C,)`` (share of the kept pixels per class; zeros when none).
    """
    if label.dim() != 3:
        raise ValueError(f"pseudo_label_stats: expected label of shape (B, H, W), got {tuple(label.shape)}")
    c = int(num_classes)
    label = label.detach().long()
    kept = (label != ignore_index) & (label >= 0) & (label < c)
    keptf = kept.float()
    n_kept = keptf.sum()
    hist = torch.zeros(c + 1, dtype=torch.float32, device=label.device)
    hist.index_add_(0, torch.where(kept, label, c).reshape(-1), keptf.reshape(-1))
    stats = {
        "kept_frac": keptf.mean(),
        "class_hist": hist[:c] / n_kept.clamp_min(1.0),
    }
    if conf is not None:
        if conf.shape != label.shape:
            raise ValueError(
                f"pseudo_label_stats: conf shape {tuple(conf.shape)} differs from label shape {tuple(label.shape)}"
            )
        stats["mean_conf"] = (conf.detach().float() * keptf).sum() / n_kept.clamp_min(1.0)
    return stats
