"""``sfdaseg train-source``: supervised training of any registered model on any labelled dataset."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sfdaseg.config import ConfigError, TrainSourceConfig, to_dict
from sfdaseg.data.transforms import build_train_transform, collate
from sfdaseg.models import save_model
from sfdaseg.engine.distributed import barrier, init_distributed
from sfdaseg.engine.rundir import check_run_dir, prepare_run_dir
from sfdaseg.engine.hooks import EvalHook
from sfdaseg.engine.trainer import Trainer
from sfdaseg.methods.source import SupervisedSegmentation
from sfdaseg.models import build_model
from sfdaseg.runs.common import dataset_from_spec, eval_loader, evaluate_model

logger = logging.getLogger(__name__)


def run_train_source(cfg: TrainSourceConfig) -> Path:
    """Train, evaluate on ``data.val`` (if given) and return the path of ``model.ckpt``."""
    dist_info, device = init_distributed(cfg.train.device)
    run_dir = Path(cfg.train.out)
    if dist_info.is_main:  # rank 0 only: the others might see the folder rank 0 has just created
        check_run_dir(run_dir, resume=cfg.train.resume)  # an existing run is refused before any work

    d = cfg.data
    transform = build_train_transform(resize=d.resize, scale_range=tuple(d.scale_range), crop=d.crop,
                                      hflip=d.hflip, photometric=d.photometric)
    train_ds = dataset_from_spec(d.train, with_labels=True, transform=transform, on_error=d.on_error,
                                 synthetic=d.synthetic)
    classes = train_ds.classes
    torch.manual_seed(cfg.train.seed)  # the same initial weights for the same seed (and on every rank)
    model = build_model(cfg.model.name, num_classes=classes.num_classes, weights=cfg.model.weights,
                        **cfg.model.options)
    logger.info(f"model {cfg.model.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
        f"train set {d.train}: {len(train_ds)} images, {classes.num_classes} classes; device {device}")

    hooks = []
    if d.val is not None:
        loader = eval_loader(d.val, resize=d.val_resize, batch_size=d.val_batch_size, num_workers=d.num_workers,
                             on_error=d.on_error, synthetic=d.synthetic, pin_memory=device.type == "cuda")
        if loader.dataset.classes.num_classes != classes.num_classes:
            raise ConfigError(f"data.val: {d.val} has {loader.dataset.classes.num_classes} classes, the training "
                              f"set {d.train} has {classes.num_classes}")

        hooks.append(EvalHook(lambda m: evaluate_model(m, loader, device=device, eval_cfg=cfg.eval).to_dict()))

    # The run folder is created once the data and the model are known to be usable: a run refused for bad input
    # leaves no folder behind that would block the corrected command.
    if dist_info.is_main:
        prepare_run_dir(run_dir, cfg=cfg, resume=cfg.train.resume, command="train-source")
    barrier()
    config = to_dict(cfg)
    trainer = Trainer(
        SupervisedSegmentation(model, ignore_index=classes.ignore_index), train_ds,
        train_cfg=cfg.train, optim_cfg=cfg.optim, batch_size=d.batch_size, num_workers=d.num_workers,
        device=device, dist_info=dist_info, run_dir=run_dir, hooks=hooks, config=config,
        save_model=lambda path, m: save_model(path, m, classes=classes, config=config), collate_fn=collate,
    )
    return trainer.train(resume=cfg.train.resume)
