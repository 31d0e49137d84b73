"""Run reports: per-class tables and image / label / prediction figures (matplotlib, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from sfdaseg.data.classes import ClassSpec, colorize


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"


def per_class_table(columns: Mapping[str, Mapping], class_names: Sequence[str]) -> str:
    """Markdown table: one row per class, one column per result (each a metrics dict with ``per_class_iou``)."""
    heads = list(columns)
    lines = ["| class | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    for name in class_names:
        cells = [columns[h]["per_class_iou"].get(name) for h in heads]
        if all(c is None for c in cells):
            continue
        lines.append(f"| {name} | " + " | ".join(_fmt(c) for c in cells) + " |")
    lines.append("| **mIoU** | " + " | ".join(f"**{_fmt(columns[h]['miou'])}**" for h in heads) + " |")
    return "\n".join(lines)


@torch.inference_mode()
def prediction_figure(path: str | Path, *, images: torch.Tensor, labels: torch.Tensor | None,
                      predictions: Mapping[str, torch.Tensor], classes: ClassSpec, max_rows: int = 4,
                      maps: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Save a grid: one row per image; columns image, label (if any), each named prediction, each scalar map.

    Args:
        images: uint8 ``(N, 3, H, W)``; labels: ``(N, H, W)``; predictions: name -> ``(N, H, W)`` class indices
            (255 = ignored, drawn black); maps: name -> ``(N, H, W)`` values in ``[0, 1]`` (e.g. confidence),
            drawn with a colour map.
    """
    maps = dict(maps or {})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["image"] + (["label"] if labels is not None else []) + list(predictions) + list(maps)
    n = min(max_rows, images.shape[0])
    h, w = images.shape[-2:]
    fig, axes = plt.subplots(n, len(cols), figsize=(2.6 * len(cols) * w / max(h, w) * 1.6, 2.6 * n * h / max(h, w) * 1.6),
                             squeeze=False)
    for r in range(n):
        panels = [images[r].permute(1, 2, 0).cpu().numpy()]
        if labels is not None:
            panels.append(colorize(labels[r].cpu().numpy(), classes.colors))
        panels += [colorize(p[r].cpu().numpy().astype(np.uint8), classes.colors) for p in predictions.values()]
        panels += [m[r].float().cpu().numpy() for m in maps.values()]
        for c, panel in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(panel, cmap="viridis", vmin=0.0, vmax=1.0) if panel.ndim == 2 else ax.imshow(panel)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
