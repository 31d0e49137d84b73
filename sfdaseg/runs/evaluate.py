"""``sfdaseg evaluate``: mIoU, per-class IoU and pixel accuracy of a checkpoint on a labelled split."""

from __future__ import annotations

import logging
import json
from pathlib import Path
from typing import Any

from sfdaseg.config import ConfigError, EvaluateConfig
from sfdaseg.models import load_model
from sfdaseg.engine.distributed import get_dist_info, init_distributed
from sfdaseg.evaluation.cost import format_cost, model_cost
from sfdaseg.runs.common import eval_loader, evaluate_model

logger = logging.getLogger(__name__)


def run_evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    dist_info, device = init_distributed(cfg.device)
    model, info = load_model(cfg.checkpoint, map_location="cpu")
    model.to(device)
    loader = eval_loader(cfg.data, resize=cfg.resize, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                         on_error=cfg.on_error, synthetic=cfg.synthetic, pin_memory=device.type == "cuda")
    n_data = loader.dataset.classes.num_classes
    if n_data != model.num_classes:
        raise ConfigError(f"checkpoint {cfg.checkpoint} predicts {model.num_classes} classes, but dataset "
                          f"{cfg.data} has {n_data}")
    metrics = evaluate_model(model, loader, device=device, eval_cfg=cfg.eval, progress=dist_info.is_main)
    result = metrics.to_dict()
    result.update({"checkpoint": str(cfg.checkpoint), "data": cfg.data, "model": model.name,
                   "eval_size": list(cfg.resize) if cfg.resize else "native", "mode": cfg.eval.mode,
                   "flip": cfg.eval.flip, "scales": list(cfg.eval.scales)})
    if get_dist_info().is_main:
        table = metrics.format_table()
        if cfg.cost:
            # The size of the first evaluation image after resizing: what one whole-image forward sees. The
            # latency passes stop after 30 s, so a large model on a CPU does not hold the evaluation up for minutes.
            size = tuple(loader.dataset[0]["image"].shape[-2:])
            result["cost"] = model_cost(model, size=size, device=device, amp=cfg.eval.amp, max_time_s=30.0)
            table += "\n" + format_cost(result["cost"])
        logger.info(table)
        if cfg.json:
            Path(cfg.json).parent.mkdir(parents=True, exist_ok=True)
            Path(cfg.json).write_text(json.dumps(result, indent=2))
            logger.info(f"wrote {cfg.json}")
    return result
