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


def _read_jsonl(path: Path) -> list[dict]:
    import json

    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curves_figure(path: str | Path, records: Sequence[Mapping], keys: Sequence[str], *, title: str = "") -> Path | None:
    """One small panel per scalar ``key`` against ``step``; None when no record has any of the keys."""
    series = {}
    for k in keys:
        pts = sorted({r["step"]: r[k] for r in records if isinstance(r.get(k), (int, float))}.items())
        if pts:
            series[k] = pts
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(series)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, (k, pts) in zip(axes.flat, series.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if len(pts) < 20 else None, markersize=3)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def markdown_to_html(text: str, *, title: str) -> str:
    """A self-contained HTML page of a markdown report (tables and images included)."""
    import html

    import markdown

    body = markdown.markdown(text, extensions=["tables", "fenced_code"])
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}pre{background:#f6f6f6;padding:1em}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{body}</body></html>\n")


def write_adapt_report(run_dir: str | Path, *, recipe: str, classes: ClassSpec, predictions: Mapping[str, torch.Tensor],
                       images: torch.Tensor, labels: torch.Tensor | None, maps: Mapping[str, torch.Tensor],
                       per_class: Mapping[str, Mapping] | None = None, extra: Mapping[str, Mapping] | None = None,
                       command: str = "", guard: Mapping | None = None) -> Path:
    """``report.md`` and ``report.html`` of an ``adapt`` run folder.

    Sections: the resolved config; training curves (loss, LR, pseudo-label statistics) and the label-free signals
    from ``metrics.jsonl``; mIoU over time when a labelled val split was evaluated during the run; per-class IoU
    before/after (``per_class``: column name -> metrics dict) and held-out domains (``extra``); example
    predictions (``predictions``: name -> (N, H, W) class ids of ``images`` (N, 3, H, W) uint8; ``maps``: name ->
    (N, H, W) in [0, 1]); the collapse guard's record (``guard``: the state of
    :class:`sfdaseg.engine.hooks.MonitorHook`).
    """
    run_dir = Path(run_dir)
    figs = run_dir / "figures"
    figs.mkdir(exist_ok=True)
    records = _read_jsonl(run_dir / "metrics.jsonl")
    train_keys = ["loss"] + sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float))
                                    and (k.startswith("loss_") or k in ("pl/kept_frac", "pl/mean_conf", "lr",
                                                                        "grad_norm"))})
    unsup_keys = sorted({k for r in records for k in r if k.startswith("unsup/") and k != "unsup/hist"})
    lines = [f"# Adaptation report: `{recipe}`", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += ["Target labels were not used for training or for choosing the checkpoint; the labelled sections "
              "below (if any) evaluate the delivered model afterwards.", ""]
    if guard is not None:
        lines += ["## Collapse guard", "", f"Policy `monitor.on_collapse={guard['on_collapse']}`; label-free "
                  f"measurements at steps {', '.join(map(str, guard['measured']))}; "
                  f"{len(guard['alarms'])} with a collapse alarm.", ""]
        for a in guard["alarms"]:
            lines.append(f"- alarm at step {a['step']}: {'; '.join(a['messages'])}")
        if guard["alarms"]:
            lines.append("")
        if guard.get("rolled_back"):
            lines += [f"**The final model raised an alarm: the delivered model is the last healthy snapshot, from "
                      f"step {guard['delivered_step']}.**", ""]
        else:
            lines += [f"The delivered model is the final one (step {guard['delivered_step']}).", ""]
    if curves_figure(figs / "training.png", records, train_keys, title="training"):
        lines += ["## Training curves", "", "![training](figures/training.png)", ""]
    if curves_figure(figs / "signals.png", records, unsup_keys, title="label-free signals (target images only)"):
        lines += ["## Label-free signals", "",
                  "Measured on a fixed sample of target images without labels (`sfdaseg.selection`): prediction "
                  "entropy, fraction of pixels above the confidence threshold, class-histogram drift from the "
                  "source model, soft neighbourhood density (higher is better) and the number of classes "
                  "predicted. Collapse alarms are logged in the run's log and in `selection.jsonl`.", "",
                  "![signals](figures/signals.png)", ""]
        alarms = [r for r in _read_jsonl(run_dir / "selection.jsonl") if r.get("alarms")]
        for r in alarms:
            lines += [f"- **alarm at step {r['step']}**: {'; '.join(r['alarms'])}"]
        if alarms:
            lines.append("")
    if curves_figure(figs / "val.png", records, ["val/miou"], title="labelled validation (evaluation only)"):
        lines += ["## Validation mIoU over time (labelled, evaluation only)", "", "![val](figures/val.png)", ""]
    if per_class:
        lines += ["## Per-class IoU before / after (labelled validation split)", "",
                  per_class_table(per_class, classes.names), ""]
    if extra:
        lines += ["## Held-out domains (mIoU)", "", "| split | " + " | ".join(next(iter(extra.values()))) + " |",
                  "|---|" + "---:|" * len(next(iter(extra.values())))]
        for split, cols in extra.items():
            lines.append(f"| {split} | " + " | ".join(_fmt(v) for v in cols.values()) + " |")
        lines.append("")
    prediction_figure(figs / "predictions.png", images=images, labels=labels, predictions=predictions,
                      classes=classes, maps=maps)
    lines += ["## Example predictions", "", "![predictions](figures/predictions.png)", ""]
    config = run_dir / "config.yaml"
    if config.exists():
        lines += ["## Resolved config", "", "```yaml", config.read_text().rstrip(), "```", ""]
    text = "\n".join(lines)
    (run_dir / "report.md").write_text(text)
    (run_dir / "report.html").write_text(markdown_to_html(text, title=f"sfdaseg adapt {recipe}"))
    return run_dir / "report.md"
