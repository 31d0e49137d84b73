"""``sfdaseg train-source``: supervised training of any registered model on any labelled dataset."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from sfdaseg.config import ConfigError, TrainSourceConfig, to_dict
from sfdaseg.data.classes import ClassSpec
from sfdaseg.data.stats import inverse_frequency_weights, log_frequency_weights, scan_labels
from sfdaseg.data.transforms import build_train_transform, collate
from sfdaseg.engine.distributed import barrier, init_distributed
from sfdaseg.engine.hooks import EvalHook
from sfdaseg.engine.rundir import check_run_dir, prepare_run_dir
from sfdaseg.engine.trainer import Trainer
from sfdaseg.methods.source import SupervisedSegmentation
from sfdaseg.models import build_model, save_model
from sfdaseg.runs.common import dataset_from_spec, eval_loader, evaluate_model
from sfdaseg.storage import atomic_write_text

logger = logging.getLogger(__name__)

CLASS_WEIGHTS_FILE = "class_weights.json"


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
                        **cfg.model.options, **({"aux_head": True} if cfg.model.aux_head else {}))
    logger.info(f"model {cfg.model.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters"
                f"{' + auxiliary head' if cfg.model.aux_head else ''}; train set {d.train}: {len(train_ds)} images, "
                f"{classes.num_classes} classes; device {device}")

    hooks = []
    val = d.val_split()
    if val is not None:
        loader = eval_loader(val, resize=d.val_resize, batch_size=d.val_batch_size, num_workers=d.num_workers,
                             on_error=d.on_error, synthetic=d.synthetic, pin_memory=device.type == "cuda")
        if loader.dataset.classes.num_classes != classes.num_classes:
            raise ConfigError(f"data.val: {val} has {loader.dataset.classes.num_classes} classes, the training "
                              f"set {d.train} has {classes.num_classes}")

        hooks.append(EvalHook(lambda m: evaluate_model(m, loader, device=device, eval_cfg=cfg.eval).to_dict()))
    class_weight = _class_weights(cfg, classes, run_dir)

    # The run folder is created once the data and the model are known to be usable: a run refused for bad input
    # leaves no folder behind that would block the corrected command.
    if dist_info.is_main:
        prepare_run_dir(run_dir, cfg=cfg, resume=cfg.train.resume, command="train-source")
        if class_weight is not None and isinstance(cfg.loss.class_weight, str):
            atomic_write_text(run_dir / CLASS_WEIGHTS_FILE, json.dumps(
                {"class_weight": class_weight.tolist(), "classes": list(classes.names)}, indent=1))
    barrier()
    config = to_dict(cfg)
    task = SupervisedSegmentation(
        model, ignore_index=classes.ignore_index,
        class_weight=None if class_weight is None else class_weight.to(device), ohem=cfg.loss.ohem,
        ohem_thresh=cfg.loss.ohem_thresh, ohem_min_kept=cfg.loss.ohem_min_kept, aux_weight=cfg.loss.aux_weight)
    trainer = Trainer(
        task, train_ds, train_cfg=cfg.train, optim_cfg=cfg.optim, batch_size=d.batch_size,
        num_workers=d.num_workers, device=device, dist_info=dist_info, run_dir=run_dir, hooks=hooks, config=config,
        save_model=lambda path, m: save_model(path, m, classes=classes, config=config), collate_fn=collate,
    )
    return trainer.train(resume=cfg.train.resume)


def _class_weights(cfg: TrainSourceConfig, classes: ClassSpec, run_dir: Path) -> torch.Tensor | None:
    """``loss.class_weight`` as a ``(C,)`` tensor; ``auto`` from the label scan (or a resumed run's saved file).

    The scan (``data.check_labels``, or needed by ``auto``) reads every training mask once: the class frequencies
    are logged and masks that label nothing are reported.
    """
    d, cw = cfg.data, cfg.loss.class_weight
    if isinstance(cw, list):
        if len(cw) != classes.num_classes:
            raise ConfigError(f"loss.class_weight: expected {classes.num_classes} weights (one per class of "
                              f"{d.train}), got {len(cw)}")
        return torch.tensor(cw, dtype=torch.float32)
    saved = run_dir / CLASS_WEIGHTS_FILE
    derived = isinstance(cw, str)  # auto | log: from the label histogram
    if derived and cfg.train.resume and saved.exists():  # the weights the run started with
        return torch.tensor(json.loads(saved.read_text())["class_weight"], dtype=torch.float32)
    if not (d.check_labels or derived):
        return None
    plain = dataset_from_spec(d.train, with_labels=True, on_error=d.on_error, synthetic=d.synthetic)
    scan = scan_labels(plain, num_classes=classes.num_classes, num_workers=d.num_workers)
    freq = scan.frequencies
    shown = ", ".join(f"{n} {100 * float(f):.2f}%" for n, f in zip(classes.names, freq))
    logger.info(f"labels of {d.train} ({scan.num_samples} masks): {shown}")
    if scan.empty:
        logger.warning(f"{d.train}: {len(scan.empty)} of {scan.num_samples} masks hold only the ignore value (they "
                       f"train nothing): {', '.join(scan.empty[:5])}{' ...' if len(scan.empty) > 5 else ''}")
    if not derived:
        return None
    weight = inverse_frequency_weights(scan.hist) if cw == "auto" else log_frequency_weights(scan.hist)
    rule = "inverse class frequency" if cw == "auto" else "ENet's 1 / ln(1.02 + f)"
    logger.info(f"loss.class_weight={cw} ({rule}, pixel-weighted mean 1): "
                + ", ".join(f"{n} {float(w):.3g}" for n, w in zip(classes.names, weight)))
    return weight
