"""Pieces that several run functions share: datasets from a config, a sharded evaluation loader."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from sfdaseg.config import ConfigError
from sfdaseg.data.datasets import build_dataset, parse_dataset_spec
from sfdaseg.data.transforms import build_eval_transform, collate
from sfdaseg.engine.distributed import ShardSampler, get_dist_info
from sfdaseg.evaluation import evaluate
from sfdaseg.storage import atomic_write_text

logger = logging.getLogger(__name__)


def dataset_from_spec(spec: str, *, with_labels: bool, transform=None, on_error: str = "raise",
                      synthetic: dict[str, Any] | None = None):
    """``build_dataset`` with the built-in benchmark's options passed only to the built-in benchmark."""
    kind = parse_dataset_spec(spec).kind
    options = dict(synthetic or {}) if kind == "synthetic" else None
    return build_dataset(spec, with_labels=with_labels, transform=transform, on_error=on_error, options=options)


def eval_loader(spec: str, *, resize: tuple[int, int] | None, batch_size: int, num_workers: int,
                on_error: str = "raise", synthetic: dict[str, Any] | None = None,
                pin_memory: bool = False) -> DataLoader:
    """A labelled evaluation loader; under DDP each rank reads a disjoint shard (the metric is reduced once)."""
    ds = dataset_from_spec(spec, with_labels=True, transform=build_eval_transform(resize=resize),
                           on_error=on_error, synthetic=synthetic)
    info = get_dist_info()
    return DataLoader(ds, batch_size=batch_size, sampler=ShardSampler(len(ds), rank=info.rank,
                                                                      world_size=info.world_size),
                      num_workers=num_workers, collate_fn=collate, pin_memory=pin_memory)


def evaluate_model(model: torch.nn.Module, loader: DataLoader, *, device: torch.device, eval_cfg,
                   progress: bool = False) -> dict[str, Any]:
    """Metrics of ``model`` on ``loader`` (``.to_dict()`` gives ``miou``, ``per_class_iou``, ...)."""
    classes = loader.dataset.classes
    metrics = evaluate(
        model, loader, device=device, num_classes=classes.num_classes, ignore_index=classes.ignore_index,
        protocol=eval_cfg.protocol, class_names=classes.names, mode=eval_cfg.mode, crop=eval_cfg.crop,
        stride=eval_cfg.stride, flip=eval_cfg.flip, scales=tuple(eval_cfg.scales), amp=eval_cfg.amp,
        progress=progress,
    )
    return metrics


def val_loaders(d, *, num_classes: int, device: torch.device,
                owner: str = "the model has") -> dict[str, DataLoader]:
    """Loaders of ``d.val`` (key ``"val"``, when given) and of every ``d.val_extra`` split (keyed by its spec).

    ``d`` is a data config with ``val``, ``val_extra``, ``val_resize``, ``val_batch_size``, ``num_workers``,
    ``on_error`` and ``synthetic``. A split with another number of classes is a ``ConfigError`` ("..., {owner} N").
    """
    loaders = {}
    for name, spec in ([("val", d.val)] if d.val else []) + [(s, s) for s in d.val_extra]:
        loader = eval_loader(spec, resize=d.val_resize, batch_size=d.val_batch_size, num_workers=d.num_workers,
                             on_error=d.on_error, synthetic=d.synthetic, pin_memory=device.type == "cuda")
        if loader.dataset.classes.num_classes != num_classes:
            raise ConfigError(f"{spec}: {loader.dataset.classes.num_classes} classes, {owner} {num_classes}")
        loaders[name] = loader
    return loaders


def evaluate_extra(model: torch.nn.Module, loaders: dict[str, DataLoader], *, device: torch.device, eval_cfg,
                   run_dir, is_main: bool) -> dict[str, Any]:
    """Metrics of ``model`` on every loader but ``"val"`` (held-out domains); rank 0 writes ``eval_extra.json``."""

    extra = {name: l for name, l in loaders.items() if name != "val"}
    results = {name: evaluate_model(model, loader, device=device, eval_cfg=eval_cfg).to_dict()
               for name, loader in extra.items()}
    if results and is_main:
        atomic_write_text(Path(run_dir) / "eval_extra.json", json.dumps(results, indent=2))
        for name, r in results.items():
            logger.info(f"{name}: mIoU {r['miou']:.2f}")
    return results
