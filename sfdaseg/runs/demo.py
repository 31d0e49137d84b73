"""``sfdaseg demo``: the whole story on the built-in benchmark, on a laptop CPU in minutes.

Stages (each in its own sub-folder of ``out``; a finished stage is reused, an interrupted one resumed):

1. ``source/``: train the model on the labelled *source* domain (the "video game");
2. ``oracle/``: train the same model on labelled *target* data: the upper bound no source-free method may use;
3. evaluate both on the *target* validation split (and on the held-out *shift* domain), write ``metrics.json``
   and ``report.md`` with the per-class table and a picture of image / label / prediction rows.

No stage reads target labels for training except the oracle, which exists only as the reference point.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import yaml

from sfdaseg.config import (ConfigError, DataConfig, DemoConfig, EvalConfig, ModelConfig, OptimConfig, TrainConfig,
                            TrainSourceConfig, to_dict)
from sfdaseg.data.transforms import to_model_input
from sfdaseg.engine.checkpoint import load_model
from sfdaseg.engine.distributed import resolve_device
from sfdaseg.engine.trainer import log
from sfdaseg.losses import resize_logits
from sfdaseg.report import per_class_table, prediction_figure
from sfdaseg.runs.common import dataset_from_spec, eval_loader, evaluate_model
from sfdaseg.runs.train_source import run_train_source


def _stage_config(cfg: DemoConfig, *, train: str, out: Path) -> TrainSourceConfig:
    synthetic = {"size": list(cfg.size), "seed": cfg.seed}
    iters = 60 if cfg.quick else cfg.iters
    return TrainSourceConfig(
        model=ModelConfig(name=cfg.model),
        data=DataConfig(train=train, val=None, resize=None, scale_range=(0.75, 1.5), crop=tuple(cfg.size),
                        hflip=True, photometric=True, batch_size=cfg.batch_size, num_workers=2,
                        synthetic={**synthetic, "length": 64 if cfg.quick else cfg.train_length}),
        optim=OptimConfig(name="adamw", lr=2e-3, weight_decay=1e-4, head_lr_mult=1.0, warmup_iters=min(50, iters // 10),
                          poly_power=0.9),
        train=TrainConfig(iters=iters, seed=cfg.seed, device=cfg.device, out=str(out), resume=True,
                          log_every=max(1, min(50, iters // 10)), ckpt_every=max(1, iters // 4), tensorboard=False),
        eval=EvalConfig(),
    )


def _train_stage(cfg: DemoConfig, name: str, train: str, out: Path) -> Path:
    """Train one stage, reusing a finished run and resuming an interrupted one with the same config."""
    stage_dir = out / name
    stage_cfg = _stage_config(cfg, train=train, out=stage_dir)
    saved = stage_dir / "config.yaml"
    if saved.exists():
        old = yaml.safe_load(saved.read_text())
        new = to_dict(stage_cfg)
        if old != new:
            raise ConfigError(f"{stage_dir}: holds a demo run with other settings; choose another --out")
        if (stage_dir / "model.ckpt").exists():
            log(f"[demo] {name}: reusing {stage_dir / 'model.ckpt'}")
            return stage_dir / "model.ckpt"
    log(f"[demo] {name}: training {cfg.model} on {train}")
    t0 = time.perf_counter()
    path = run_train_source(stage_cfg)
    log(f"[demo] {name}: done in {time.perf_counter() - t0:.0f} s")
    return path


def run_demo(cfg: DemoConfig) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    t_start = time.perf_counter()
    synthetic = {"size": list(cfg.size), "seed": cfg.seed, "length": 32 if cfg.quick else cfg.val_length}
    eval_cfg = EvalConfig()

    ckpts = {"source_only": _train_stage(cfg, "source", "synthetic:source:train", out),
             "oracle": _train_stage(cfg, "oracle", "synthetic:target:train", out)}

    splits = {"target": "synthetic:target:val", "shift": "synthetic:shift:val", "source": "synthetic:source:val"}
    loaders = {k: eval_loader(v, resize=None, batch_size=16, num_workers=0, synthetic=synthetic)
               for k, v in splits.items()}
    models = {k: load_model(p)[0].to(device).eval() for k, p in ckpts.items()}
    results: dict[str, Any] = {}
    for mname, model in models.items():
        for split, loader in loaders.items():
            results[f"{mname}@{split}"] = evaluate_model(model, loader, device=device, eval_cfg=eval_cfg).to_dict()

    target = {k: results[f"{k}@target"] for k in models}
    metrics = {
        "benchmark": "sfdaseg built-in synthetic: source -> target",
        "eval": {"split": splits["target"], "protocol": "all 19 trainIds (absent classes left out)",
                 "size": list(cfg.size), "num_images": target["source_only"]["num_images"]},
        "model": cfg.model, "iters": 60 if cfg.quick else cfg.iters, "seed": cfg.seed, "quick": cfg.quick,
        "source_only": target["source_only"],
        "oracle": target["oracle"],
        "gap": target["oracle"]["miou"] - target["source_only"]["miou"],
        "shift": {k: results[f"{k}@shift"] for k in models},
        "source_domain": {k: results[f"{k}@source"] for k in models},
        "checkpoints": {k: str(p) for k, p in ckpts.items()},
        "command": f"sfdaseg demo --out {cfg.out}" + (" --quick" if cfg.quick else ""),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))

    # Picture: the first target-val images with label, source-only and oracle predictions.
    val = dataset_from_spec(splits["target"], with_labels=True, synthetic=synthetic)
    samples = [val[i] for i in range(4)]
    images = torch.stack([s["image"] for s in samples])
    labels = torch.stack([s["mask"] for s in samples])
    preds = {}
    with torch.inference_mode():
        x = to_model_input(images.to(device))
        for k, model in models.items():
            preds[k.replace("_", "-")] = resize_logits(model(x), tuple(images.shape[-2:])).argmax(1).cpu()
    prediction_figure(out / "predictions.png", images=images, labels=labels, predictions=preds, classes=val.classes)

    names = val.classes.names
    report = [
        "# sfdaseg demo report",
        "",
        f"Benchmark: {metrics['benchmark']}; evaluation on `{splits['target']}` ({metrics['eval']['num_images']} "
        f"images, {cfg.size[1]}x{cfg.size[0]}), IoU in %, classes absent from labels and predictions left out.",
        f"Model: `{cfg.model}`, {metrics['iters']} iterations per training run, seed {cfg.seed}. "
        f"Reproduce: `{metrics['command']}`.",
        "",
        f"Source-only mIoU **{target['source_only']['miou']:.1f}**, target oracle **{target['oracle']['miou']:.1f}**: "
        f"a gap of **{metrics['gap']:.1f}** points for source-free adaptation to close.",
        "",
        "## Per-class IoU on the target validation split",
        "",
        per_class_table({"source-only": target["source_only"], "oracle": target["oracle"]}, names),
        "",
        "## Other domains (mIoU)",
        "",
        "| model | source val | target val | shift val (held out) |",
        "|---|---:|---:|---:|",
    ]
    for k in models:
        report.append(f"| {k} | {results[f'{k}@source']['miou']:.1f} | {results[f'{k}@target']['miou']:.1f} | "
                      f"{results[f'{k}@shift']['miou']:.1f} |")
    report += ["", "## Predictions on target validation images", "", "![predictions](predictions.png)", "",
               f"Total demo time: {time.perf_counter() - t_start:.0f} s on {device}."]
    (out / "report.md").write_text("\n".join(report) + "\n")
    log(f"[demo] source-only {target['source_only']['miou']:.1f} mIoU, oracle {target['oracle']['miou']:.1f} "
        f"on the target val split; report: {out / 'report.md'}")
    return ckpts["source_only"]
