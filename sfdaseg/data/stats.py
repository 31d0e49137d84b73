"""One pass over a labelled dataset's masks: class frequencies, and the masks that label nothing.

``train-source`` reads every training mask once before training (``data.check_labels``): the class histogram is
logged (an imbalanced source shows at once), masks that hold only the ignore value are reported (they train
nothing), and ``loss.class_weight=auto`` takes its inverse-frequency weights from the same histogram.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from sfdaseg.data.datasets import worker_died

__all__ = ["LabelScan", "inverse_frequency_weights", "log_frequency_weights", "scan_labels"]


class _MaskCounts(Dataset):
    """``(class histogram (C,), name)`` of each sample of a labelled dataset (decoded in DataLoader workers)."""

    def __init__(self, dataset: Dataset, num_classes: int) -> None:
        self.dataset, self.num_classes = dataset, num_classes

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        sample = self.dataset[index]
        mask = sample["mask"].long().flatten()
        valid = mask < self.num_classes
        hist = torch.bincount(mask[valid], minlength=self.num_classes)[: self.num_classes]
        return hist, str(sample.get("name", index))


@dataclass
class LabelScan:
    """What :func:`scan_labels` found: ``hist`` ``(C,)`` labelled pixels per class, masks without a label."""

    hist: torch.Tensor
    empty: list[str]
    num_samples: int

    @property
    def frequencies(self) -> torch.Tensor:
        return self.hist.double() / self.hist.sum().clamp_min(1)


def scan_labels(dataset: Dataset, *, num_classes: int, num_workers: int = 0, batch_size: int = 16) -> LabelScan:
    """Read every mask of ``dataset`` (a labelled dataset without random transform) once."""
    loader = DataLoader(_MaskCounts(dataset, num_classes), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=lambda items: items)
    hist = torch.zeros(num_classes, dtype=torch.long)
    empty: list[str] = []
    n = 0
    try:
        for items in loader:
            for h, name in items:
                hist += h
                n += 1
                if int(h.sum()) == 0:
                    empty.append(name)
    except RuntimeError as e:
        hinted = worker_died(e)
        if hinted is e:
            raise
        raise hinted from e
    return LabelScan(hist=hist, empty=empty, num_samples=n)


def inverse_frequency_weights(hist: torch.Tensor) -> torch.Tensor:
    """``(C,)`` class weights ``w_c proportional to 1 / f_c``, scaled so the pixel-weighted mean is 1.

    ``f_c`` is the class's share of the labelled pixels; with ``w_c = 1 / (K f_c)`` over the ``K`` classes present,
    ``sum_c f_c w_c = 1``: the loss keeps its scale (and the learning rate its meaning) while every class weighs
    the same in total. Classes with no pixel get 1 (no pixel carries them).
    """
    f = hist.double() / hist.sum().clamp_min(1)
    present = f > 0
    w = torch.ones_like(f)
    w[present] = 1.0 / (present.sum() * f[present])
    return w.float()


def log_frequency_weights(hist: torch.Tensor, *, c: float = 1.02) -> torch.Tensor:
    """``(C,)`` class weights ``w_c proportional to 1 / ln(c + f_c)`` (ENet, Paszke et al. 2016), pixel-weighted mean 1.

    Bounded between ``1 / ln(1 + c)`` and ``1 / ln(c)`` before scaling (about 1.4 to 50 at ``c`` = 1.02), so a
    background of 90% of the pixels is down-weighted far less than by ``1 / f``. Classes with no pixel get 1.
    """
    f = hist.double() / hist.sum().clamp_min(1)
    present = f > 0
    w = torch.ones_like(f)
    raw = 1.0 / torch.log(c + f[present])
    w[present] = raw / (f[present] * raw).sum()
    return w.float()
