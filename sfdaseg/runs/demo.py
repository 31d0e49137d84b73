"""``sfdaseg demo``: the whole story on the built-in benchmark, on a CPU in tens of minutes (``--quick``: a short smoke run).

Stages (each in its own sub-folder of ``out``; a finished stage is reused, an interrupted one resumed):

1. ``source/``: train the model on the labelled *source* domain (the "video game");
2. ``oracle/``: train the same model on labelled *target* data: the upper bound no source-free method may use;
3. ``adapted_<recipe>/``: adapt the source model to unlabelled target images with a recipe (``selftrain`` by
   default) at its shipped defaults, as ``sfdaseg adapt --recipe R`` runs it;
4. evaluate all three on the *target* test split (the headline; generated with another seed than every split
   a setting was chosen on), the target val split, the held-out *shift* domain and the source domain, write
   ``metrics.json`` and ``report.md``: per-class table, source-only vs adapted predictions side by side, and the
   source model's pseudo-labels with their confidence.

Only the oracle is trained with target labels, as the reference point; evaluation with labels comes last.
"""

from __future__ import annotations

import logging
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from sfdaseg.config import (AdaptConfig, AdaptDataConfig, ConfigError, DataConfig, DemoConfig, EvalConfig,
                            ModelConfig, OptimConfig, TrainConfig, TrainSourceConfig, to_dict)
from sfdaseg.data.transforms import to_model_input
from sfdaseg.models import load_model
from sfdaseg.engine.distributed import resolve_device
from sfdaseg.losses import resize_logits
from sfdaseg.report import per_class_table, prediction_figure
from sfdaseg.runs.adapt import run_adapt
from sfdaseg.runs.common import dataset_from_spec, eval_loader, evaluate_model
from sfdaseg.runs.train_source import run_train_source

logger = logging.getLogger(__name__)

QUICK_ITERS = 60


def _synthetic(cfg: DemoConfig) -> dict[str, Any]:
    return {"size": list(cfg.size), "seed": cfg.seed, "length": 64 if cfg.quick else cfg.train_length}


def _source_config(cfg: DemoConfig, *, train: str, out: Path) -> TrainSourceConfig:
    iters = QUICK_ITERS if cfg.quick else cfg.iters
    return TrainSourceConfig(
        model=ModelConfig(name=cfg.model),
        data=DataConfig(train=train, val=None, resize=None, scale_range=(0.75, 1.5), crop=tuple(cfg.size),
                        hflip=True, photometric=False, batch_size=cfg.batch_size, num_workers=2,
                        synthetic=_synthetic(cfg)),
        optim=OptimConfig(name="adamw", lr=2e-3, weight_decay=1e-4, head_lr_mult=1.0,
                          warmup_iters=min(50, iters // 10), poly_power=0.9),
        train=TrainConfig(iters=iters, seed=cfg.seed, device=cfg.device, out=str(out), resume=True,
                          log_every=max(1, min(50, iters // 10)), ckpt_every=max(1, iters // 4), tensorboard=False),
        eval=EvalConfig(),
    )


def _adapt_config(cfg: DemoConfig, *, source: Path, out: Path) -> AdaptConfig:
    iters = QUICK_ITERS if cfg.quick else cfg.adapt_iters
    # The recipe's shipped defaults (method and optimizer): what a user gets without a config. Only the data
    # and the schedule are the demo's.
    return AdaptConfig(
        recipe=cfg.recipe, checkpoint=str(source), export="teacher", method={},
        data=AdaptDataConfig(target="synthetic:target:train", val=None, scale_range=(0.75, 1.5),
                             crop=tuple(cfg.size), batch_size=cfg.batch_size, num_workers=2,
                             cache_dir=str(out.parent / "cache"), synthetic=_synthetic(cfg)),
        train=TrainConfig(iters=iters, seed=cfg.seed, device=cfg.device, out=str(out), resume=True,
                          log_every=max(1, min(50, iters // 10)), ckpt_every=max(1, iters // 4), tensorboard=False),
    )


def _stage(name: str, stage_cfg: Any, out: Path, run: Callable[[Any], Path]) -> Path:
    """Run one stage, reusing a finished run and resuming an interrupted one with the same config."""
    stage_dir = out / name
    saved = stage_dir / "config.yaml"
    if saved.exists():
        old, new = yaml.safe_load(saved.read_text()), to_dict(stage_cfg)
        if name.startswith("adapted"):
            old.pop("method", None)  # the adapt run records the recipe's resolved defaults there
            new.pop("method", None)
        if old != new:
            raise ConfigError(f"{stage_dir}: holds a demo run with other settings; choose another --out")
        if (stage_dir / "model.ckpt").exists():
            logger.info(f"[demo] {name}: reusing {stage_dir / 'model.ckpt'}")
            return stage_dir / "model.ckpt"
    logger.info(f"[demo] {name}: start")
    t0 = time.perf_counter()
    path = run(stage_cfg)
    logger.info(f"[demo] {name}: done in {time.perf_counter() - t0:.0f} s")
    return path


def run_demo(cfg: DemoConfig) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    t_start = time.perf_counter()

    source = _stage("source", _source_config(cfg, train="synthetic:source:train", out=out / "source"), out,
                    run_train_source)
    oracle = _stage("oracle", _source_config(cfg, train="synthetic:target:train", out=out / "oracle"), out,
                    run_train_source)
    # One folder per recipe, so that trying another recipe reuses the source and oracle stages.
    adapted = _stage(f"adapted_{cfg.recipe}", _adapt_config(cfg, source=source, out=out / f"adapted_{cfg.recipe}"),
                     out, run_adapt)
    ckpts = {"source_only": source, "adapted": adapted, "oracle": oracle}

    synthetic = {"size": list(cfg.size), "seed": cfg.seed, "length": 32 if cfg.quick else cfg.val_length}
    splits = {"target": "synthetic:target:test", "val": "synthetic:target:val", "shift": "synthetic:shift:val",
              "source": "synthetic:source:val"}
    loaders = {k: eval_loader(v, resize=None, batch_size=16, num_workers=0, synthetic=synthetic)
               for k, v in splits.items()}
    models = {k: load_model(p)[0].to(device).eval() for k, p in ckpts.items()}
    results: dict[str, Any] = {}
    for mname, model in models.items():
        for split, loader in loaders.items():
            results[f"{mname}@{split}"] = evaluate_model(model, loader, device=device, eval_cfg=EvalConfig()).to_dict()

    target = {k: results[f"{k}@target"] for k in models}
    so, ad, orc = (target[k]["miou"] for k in ("source_only", "adapted", "oracle"))
    metrics = {
        "benchmark": "sfdaseg built-in synthetic: source -> target",
        "eval": {"split": splits["target"], "protocol": "all 19 trainIds (absent classes left out)",
                 "size": list(cfg.size), "num_images": target["source_only"]["num_images"]},
        "model": cfg.model, "recipe": cfg.recipe, "seed": cfg.seed, "quick": cfg.quick,
        "iters": QUICK_ITERS if cfg.quick else cfg.iters, "adapt_iters": QUICK_ITERS if cfg.quick else cfg.adapt_iters,
        "source_only": target["source_only"],
        "adapted": target["adapted"],
        "oracle": target["oracle"],
        "gap": orc - so,
        "gap_closure": (ad - so) / (orc - so) if orc != so else None,
        "target_val": {k: results[f"{k}@val"] for k in models},
        "shift": {k: results[f"{k}@shift"] for k in models},
        "source_domain": {k: results[f"{k}@source"] for k in models},
        "checkpoints": {k: str(p) for k, p in ckpts.items()},
        "command": f"sfdaseg demo --out {cfg.out}" + (" --quick" if cfg.quick else ""),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))

    # Pictures: target-test images with label, source-only / adapted / oracle predictions, and what self-training
    # starts from: the source model's pseudo-labels and their confidence.
    val = dataset_from_spec(splits["target"], with_labels=True, synthetic=synthetic)
    samples = [val[i] for i in range(4)]
    images = torch.stack([s["image"] for s in samples])
    labels = torch.stack([s["mask"] for s in samples])
    preds, conf = {}, None
    with torch.inference_mode():
        x = to_model_input(images.to(device))
        for k, model in models.items():
            probs = torch.softmax(resize_logits(model(x), tuple(images.shape[-2:])).float(), dim=1)
            preds[k.replace("_", "-")] = probs.argmax(1).cpu()
            if k == "source_only":
                conf = probs.max(1).values.cpu()
    prediction_figure(out / "predictions.png", images=images, labels=labels, predictions=preds, classes=val.classes)
    prediction_figure(out / "pseudo_labels.png", images=images, labels=labels,
                      predictions={"source pseudo-label": preds["source-only"]}, maps={"confidence": conf},
                      classes=val.classes)

    names = val.classes.names
    gc = metrics["gap_closure"]
    report = [
        "# sfdaseg demo report",
        "",
        f"Benchmark: {metrics['benchmark']}; evaluation on `{splits['target']}` ({metrics['eval']['num_images']} "
        f"images, {cfg.size[1]}x{cfg.size[0]}), IoU in %, classes absent from labels and predictions left out.",
        f"Model: `{cfg.model}`; source and oracle {metrics['iters']} iterations, adaptation with `{cfg.recipe}` "
        f"{metrics['adapt_iters']} iterations at its shipped defaults (final checkpoint, or the collapse guard's "
        f"last healthy one; no target labels); seed {cfg.seed}. "
        f"Reproduce: `{metrics['command']}`.",
        "",
        f"Source-only mIoU **{so:.1f}**, adapted **{ad:.1f}**, target oracle **{orc:.1f}**: adaptation closed "
        f"**{100 * gc:.0f}%** of the {orc - so:.1f}-point gap." if gc is not None else
        f"Source-only {so:.1f}, adapted {ad:.1f}, oracle {orc:.1f}.",
        "",
        "## Per-class IoU on the target test split",
        "",
        per_class_table({"source-only": target["source_only"], "adapted": target["adapted"],
                         "oracle": target["oracle"]}, names),
        "",
        "## Every domain (mIoU)",
        "",
        "| model | source val | target test | target val | shift val (held out) |",
        "|---|---:|---:|---:|---:|",
    ]
    for k in models:
        report.append(f"| {k} | {results[f'{k}@source']['miou']:.1f} | {results[f'{k}@target']['miou']:.1f} | "
                      f"{results[f'{k}@val']['miou']:.1f} | {results[f'{k}@shift']['miou']:.1f} |")
    report += ["", "## Predictions on target test images", "", "![predictions](predictions.png)", "",
               "## What self-training starts from: the source model's pseudo-labels and confidence", "",
               "![pseudo-labels](pseudo_labels.png)", "",
               f"Total demo time: {time.perf_counter() - t_start:.0f} s on {device}."]
    (out / "report.md").write_text("\n".join(report) + "\n")
    logger.info(f"[demo] target test mIoU: source-only {so:.1f}, adapted ({cfg.recipe}) {ad:.1f}, oracle {orc:.1f}; "
        f"report: {out / 'report.md'}")
    return adapted
