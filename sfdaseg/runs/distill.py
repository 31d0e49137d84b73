"""``sfdaseg distill``: distil one or several frozen adapted teachers into one (smaller) student.

Reads target *images* only (the target dataset is opened with ``with_labels=False``). The teachers are loaded
from their checkpoints, frozen, each with its own architecture and input normalisation; their softmax outputs
are averaged. The student trains through the one trainer (:class:`sfdaseg.distill.DistillationTask`), is saved
as ``model.ckpt`` in the standard format, and is evaluated on ``data.val`` (and ``data.val_extra``) at the end
when given.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sfdaseg.config import DistillConfig, to_dict
from sfdaseg.data.transforms import build_train_transform, collate
from sfdaseg.distill import DistillationTask, build_student, load_teachers
from sfdaseg.models import save_model
from sfdaseg.engine.distributed import barrier, init_distributed
from sfdaseg.engine.rundir import check_run_dir, prepare_run_dir
from sfdaseg.engine.hooks import EvalHook
from sfdaseg.engine.trainer import Trainer
from sfdaseg.runs.common import dataset_from_spec, evaluate_extra, evaluate_model, val_loaders

logger = logging.getLogger(__name__)


def run_distill(cfg: DistillConfig) -> Path:
    """Distil, evaluate on ``data.val`` / ``data.val_extra`` when given, and return the path of ``model.ckpt``."""
    dist_info, device = init_distributed(cfg.train.device)
    run_dir = Path(cfg.train.out)
    if dist_info.is_main:
        check_run_dir(run_dir, resume=cfg.train.resume)  # refused before any work

    # Teachers and student are checked before the run folder exists: a refused run leaves nothing behind.
    teachers, classes = load_teachers(cfg.teachers, device=device)
    torch.manual_seed(cfg.train.seed)  # the same fresh student for the same seed (and on every rank)
    student = build_student(cfg.model, classes=classes, checkpoint=cfg.student_checkpoint,
                            options=cfg.model_options)
    student.to(device)

    d = cfg.data
    train_tf = build_train_transform(resize=d.resize, scale_range=tuple(d.scale_range), crop=d.crop, hflip=d.hflip,
                                     photometric=False, track_valid=True)
    train_ds = dataset_from_spec(d.target, with_labels=False, transform=train_tf, on_error=d.on_error,
                                 synthetic=d.synthetic)
    n_params = sum(p.numel() for p in student.parameters()) / 1e6
    init = f"from {cfg.student_checkpoint}" if cfg.student_checkpoint else "random init"
    logger.info(f"distill {len(teachers)} teacher(s) ({', '.join(str(t) for t in cfg.teachers)}) into {student.name} "
        f"({n_params:.2f}M parameters, {init}); target {d.target}: {len(train_ds)} images (labels not read); "
        f"T={cfg.temperature}; device {device}")

    loaders = val_loaders(d, num_classes=classes.num_classes, device=device, owner="the teachers have")

    hooks = []
    if "val" in loaders:
        hooks.append(EvalHook(lambda m: evaluate_model(m, loaders["val"], device=device, eval_cfg=cfg.eval).to_dict()))

    if dist_info.is_main:
        prepare_run_dir(run_dir, cfg=cfg, resume=cfg.train.resume, command="distill")
    barrier()
    task = DistillationTask(student, teachers, temperature=cfg.temperature, kd_weight=cfg.kd_weight,
                            ce_weight=cfg.ce_weight, ignore_index=classes.ignore_index, photometric=cfg.photometric)
    config = to_dict(cfg)
    meta = {"distilled_from": [str(t) for t in cfg.teachers],
            "student_init": str(cfg.student_checkpoint) if cfg.student_checkpoint else "random"}
    trainer = Trainer(task, train_ds, train_cfg=cfg.train, optim_cfg=cfg.optim, batch_size=d.batch_size,
                      num_workers=d.num_workers, device=device, dist_info=dist_info, run_dir=run_dir,
                      hooks=hooks, config=config, collate_fn=collate,
                      save_model=lambda path, m: save_model(path, m, classes=classes, config=config, meta=meta))
    path = trainer.train(resume=cfg.train.resume)

    evaluate_extra(student, loaders, device=device, eval_cfg=cfg.eval, run_dir=run_dir, is_main=dist_info.is_main)
    return path
