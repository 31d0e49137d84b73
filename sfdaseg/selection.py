"""Target-only signals for judging an adaptation run without labels, and a collapse alarm.

Source-free adaptation has no labelled target data, so a user cannot look at mIoU to know whether a run went
well or which checkpoint to keep. These signals are computed from the model's predictions on a fixed sample of
*unlabelled* target images (labels are never read here):

- ``entropy``: mean per-pixel prediction entropy, normalised by ``log C`` to 0..1. Self-training drives it
  down; a value near 0 together with a vanishing class is the signature of collapse.
- ``kept_frac``: fraction of pixels whose max probability reaches ``tau`` (what a threshold policy would keep).
- ``hist_drift``: total-variation distance (0..1) between the predicted class histogram and the source model's
  on the same images. Some drift is the point of adaptation; a large one means classes were swallowed.
- ``snd``: soft neighbourhood density (Saito et al., ICCV 2021): L2-normalised softmax vectors of sampled
  pixels, cosine similarities scaled by 1/0.05 with the self-similarity removed, a softmax per row, and the
  mean entropy of those rows. The paper picks the checkpoint with the *highest* SND.
- ``classes_present``: number of classes that are the argmax of at least ``min_class_frac`` of the pixels.

How well each signal ranks checkpoints against the true mIoU on the built-in benchmark is measured by
``sfdaseg bench`` (rank correlation, in its report); no code path lets target labels pick a checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from sfdaseg.data.transforms import to_model_input
from sfdaseg.losses import resize_logits

logger = logging.getLogger(__name__)

SIGNALS = ("entropy", "kept_frac", "hist_drift", "snd", "classes_present")
# Which direction of each signal the literature reads as "better" (+1: higher is better). Entropy and drift are
# not monotone in accuracy (a collapsed model is very confident); bench measures what each is worth.
SIGNAL_SIGN = {"entropy": -1, "kept_frac": 1, "hist_drift": -1, "snd": 1, "classes_present": 1}


def soft_neighborhood_density(probs: torch.Tensor, *, temperature: float = 0.05) -> torch.Tensor:
    """SND of a set of probability vectors.

    Args:
        probs: (N, C) softmax outputs of N sampled pixels.
    Returns:
        () mean over rows of the entropy of ``softmax(cos_sim / temperature)`` with the diagonal removed.
    """
    z = F.normalize(probs.float(), dim=1)
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))  # a pixel is not its own neighbour
    p = torch.softmax(sim, dim=1)
    ent = -(p * torch.log(p.clamp_min(1e-12))).sum(1)
    return ent.mean()


@torch.no_grad()
def prediction_signals(model: nn.Module, batches: Iterable[torch.Tensor], *, num_classes: int,
                       source_hist: torch.Tensor | None = None, tau: float = 0.968, snd_pixels: int = 1024,
                       min_class_frac: float = 1e-3, generator: torch.Generator | None = None,
                       device: torch.device | None = None) -> dict[str, float | list[float]]:
    """The target-only signals of ``model`` on ``batches`` of unlabelled images.

    Args:
        model: returns logits (B, C, h, w) for images; put in eval mode here and restored afterwards.
        batches: iterable of uint8 (B, 3, H, W) or float 0..1 images.
        source_hist: (C,) class histogram of the source model on the same images, for ``hist_drift``.
        snd_pixels: pixels sampled per batch for SND (its cost is ``snd_pixels**2``).
    Returns:
        ``entropy``, ``kept_frac``, ``snd``, ``classes_present``, ``hist`` (normalised class histogram, a list)
        and ``hist_drift`` when ``source_hist`` is given.
    """
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    ent_sum = torch.zeros((), device=device, dtype=torch.float64)
    kept_sum = torch.zeros((), device=device, dtype=torch.float64)
    hist = torch.zeros(num_classes, device=device, dtype=torch.float64)
    snd_sum = torch.zeros((), device=device, dtype=torch.float64)
    pixels, snd_batches = 0, 0
    try:
        for images in batches:
            x = to_model_input(images.to(device))
            logits = resize_logits(model(x), tuple(x.shape[-2:])).float()
            probs = torch.softmax(logits, dim=1)  # (B, C, H, W)
            conf, label = probs.max(1)
            ent = -(probs * torch.log(probs.clamp_min(1e-12))).sum(1) / math.log(num_classes)
            ent_sum += ent.sum()
            kept_sum += (conf >= tau).sum()
            hist += torch.bincount(label.flatten(), minlength=num_classes)[:num_classes]
            pixels += label.numel()
            flat = probs.permute(0, 2, 3, 1).reshape(-1, num_classes)
            idx = torch.randperm(flat.shape[0], generator=generator)[:snd_pixels].to(device)
            snd_sum += soft_neighborhood_density(flat[idx])
            snd_batches += 1
    finally:
        model.train(was_training)
    if pixels == 0:
        raise ValueError("prediction_signals: no images were given")
    h = hist / hist.sum()
    out: dict[str, float | list[float]] = {
        "entropy": float(ent_sum / pixels), "kept_frac": float(kept_sum / pixels),
        "snd": float(snd_sum / snd_batches), "classes_present": int((h >= min_class_frac).sum()),
        "hist": h.tolist(),
    }
    if source_hist is not None:
        out["hist_drift"] = class_hist_drift(h, source_hist.to(h))
    return out


def class_hist_drift(hist: torch.Tensor, reference: torch.Tensor) -> float:
    """Total-variation distance 0..1 between two (C,) class histograms (normalised here)."""
    p = hist.double() / hist.double().sum().clamp_min(1e-12)
    q = reference.double() / reference.double().sum().clamp_min(1e-12)
    return float(0.5 * (p - q).abs().sum())


@dataclass
class CollapseAlarm:
    """Warns when adaptation is collapsing, from the target-only signals alone.

    A class *vanishes* when the source model predicted it on at least ``min_source_frac`` of the pixels and the
    current model predicts it on less than ``vanish_ratio`` times that. Entropy *collapses* when it falls below
    ``entropy_ratio`` times the source model's.
    """

    min_source_frac: float = 0.005
    vanish_ratio: float = 0.1
    entropy_ratio: float = 0.2

    def check(self, signals: dict, source: dict, class_names: list[str] | None = None) -> list[str]:
        """Warnings (empty when all is well) comparing ``signals`` with the ``source`` model's signals."""
        warnings = []
        cur, ref = signals.get("hist"), source.get("hist")
        if cur is not None and ref is not None:
            gone = [c for c, (a, b) in enumerate(zip(cur, ref))
                    if b >= self.min_source_frac and a < self.vanish_ratio * b]
            if gone:
                names = [class_names[c] if class_names else str(c) for c in gone]
                warnings.append(f"class(es) vanished from the predictions: {', '.join(names)} "
                                f"(source model predicted them on >= {100 * self.min_source_frac:.1f}% of pixels)")
        if "entropy" in signals and "entropy" in source and source["entropy"] > 0:
            if signals["entropy"] < self.entropy_ratio * source["entropy"]:
                warnings.append(f"prediction entropy collapsed: {signals['entropy']:.4f} vs "
                                f"{source['entropy']:.4f} for the source model")
        return warnings


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when fewer than 3 pairs or a constant input."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} vs {len(y)} values")
    if len(x) < 3:
        return float("nan")

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2.0
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return float("nan")
    return cov / math.sqrt(vx * vy)


class TargetMonitor:
    """Measures the signals on a fixed sample of target images during a run (rank 0; the Trainer's ``monitor``).

    The reference (the source model's signals on the same images) is measured once at construction, so a resumed
    run compares against the same numbers. Every measurement is appended to ``RUN/selection.jsonl``; warnings of
    the :class:`CollapseAlarm` are logged; with ``keep_checkpoints`` a snapshot ``snapshots/step_N.ckpt`` is kept
    so a checkpoint can be chosen afterwards from these signals alone.
    """

    def __init__(self, images: list[torch.Tensor], *, source_model: nn.Module, num_classes: int,
                 class_names: list[str] | None, tau: float, snd_pixels: int, batch_size: int,
                 device: torch.device, run_dir=None, save_snapshot=None) -> None:
        """``images``: uint8 (3, H, W) target images (sizes may differ; equal sizes are batched)."""
        self.images, self.num_classes, self.class_names = images, num_classes, class_names
        self.tau, self.snd_pixels, self.batch_size, self.device = tau, snd_pixels, batch_size, device
        self.run_dir, self.save_snapshot = run_dir, save_snapshot
        self.alarm = CollapseAlarm()
        self.last_alarms: list[str] = []  # the messages of the last measurement's alarms
        self.reference = self.measure(source_model)

    def _batches(self):
        i = 0
        while i < len(self.images):
            j = i + 1
            while j < len(self.images) and j - i < self.batch_size and self.images[j].shape == self.images[i].shape:
                j += 1
            yield torch.stack(self.images[i:j])
            i = j

    def measure(self, model: nn.Module, source_hist: torch.Tensor | None = None) -> dict:
        # The same pixels are sampled for SND at every measurement, so the values are comparable over time.
        gen = torch.Generator().manual_seed(0)
        return prediction_signals(model, self._batches(), num_classes=self.num_classes, source_hist=source_hist,
                                  tau=self.tau, snd_pixels=self.snd_pixels, generator=gen, device=self.device)

    def __call__(self, model: nn.Module, step: int) -> dict:
        ref_hist = torch.tensor(self.reference["hist"], dtype=torch.float64)
        sig = self.reference if step == 0 else self.measure(model, source_hist=ref_hist)
        sig = {**sig, "hist_drift": class_hist_drift(torch.tensor(sig["hist"]), ref_hist)}
        warnings = self.alarm.check(sig, self.reference, self.class_names) if step > 0 else []
        self.last_alarms = warnings
        for w in warnings:
            logger.warning(f"step {step}: {w}")
        record = {"step": step, **sig, "alarms": warnings}
        if self.run_dir is not None:
            if self.save_snapshot is not None and step > 0:
                path = self.run_dir / "snapshots" / f"step_{step}.ckpt"
                path.parent.mkdir(exist_ok=True)
                self.save_snapshot(path, model)
                record["checkpoint"] = str(path)
            with open(self.run_dir / "selection.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        return {k: sig[k] for k in SIGNALS} | {"alarms": len(warnings)}
