"""``sfdaseg adapt``: source-free adaptation of a source checkpoint to unlabelled target images.

Reads target *images* only: the target dataset is opened with ``with_labels=False``, so its mask files are
never read. A labelled validation split, when given, is used once, at the end, for evaluation.
"""

from __future__ import annotations

import logging
import json
import os
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import Dataset

from sfdaseg.config import AdaptConfig, to_dict
from sfdaseg.data.transforms import build_eval_transform, build_train_transform, collate, to_model_input
from sfdaseg.models import load_model, save_model
from sfdaseg.engine.distributed import barrier, init_distributed
from sfdaseg.engine.rundir import check_run_dir, prepare_run_dir
from sfdaseg.engine.hooks import EvalHook, MonitorHook
from sfdaseg.engine.trainer import Trainer
from sfdaseg.losses import resize_logits
from sfdaseg.methods import get_recipe
from sfdaseg.methods.common import AdaptContext, OfflineLabelRequest
from sfdaseg.offline_labels import OfflineLabelCache, WithOfflineLabels, build_offline_labels, model_fingerprint
from sfdaseg.report import write_adapt_report
from sfdaseg.runs.common import dataset_from_spec, evaluate_extra, evaluate_model, val_loaders
from sfdaseg.selection import TargetMonitor
from sfdaseg.storage import atomic_write_text

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path(os.environ.get("SFDASEG_CACHE", Path.home() / ".cache" / "sfdaseg")) / "pseudo_labels"


def target_datasets(model, request: OfflineLabelRequest | None, d, *, device: torch.device, is_main: bool = True,
                    amp: str = "fp32", progress: bool = True, before_labelling=lambda: None,
                    fingerprint_extra: dict | None = None) -> tuple[Dataset, Dataset]:
    """The target datasets of a recipe: ``(training set with the random transform, native-size set)``.

    ``d`` is an adapt data config (``target``, ``resize``, ``scale_range``, ``crop``, ``hflip``, ``on_error``,
    ``synthetic``, ``cache_dir``, ``val_batch_size``, ``num_workers``). When the recipe asks for offline
    pseudo-labels (``request``), rank 0 labels the target images with ``model`` into the cache first (or a finished
    cache is read as it is), and both sets carry ``pl_label`` / ``pl_conf``. ``before_labelling`` runs once the
    target images are known to be readable, before the (long) labelling pass: ``adapt`` creates its run folder
    there. Labels of the target are never read.
    """
    train_tf = build_train_transform(resize=None if request else d.resize, scale_range=tuple(d.scale_range),
                                     crop=d.crop, hflip=d.hflip, photometric=False, track_valid=True)
    if request is None:
        train_ds = dataset_from_spec(d.target, with_labels=False, transform=train_tf, on_error=d.on_error,
                                     synthetic=d.synthetic)
        target_ctx = dataset_from_spec(d.target, with_labels=False, on_error=d.on_error, synthetic=d.synthetic)
        before_labelling()
        return train_ds, target_ctx
    # The labeller sees the images at the training resolution (data.resize): the cached labels then line up with
    # what the random crop/flip/scale of every step cuts out.
    base = dataset_from_spec(d.target, with_labels=False, transform=build_eval_transform(resize=d.resize),
                             on_error=d.on_error, synthetic=d.synthetic)
    before_labelling()
    if request.cache:  # a finished cache that other models wrote (e.g. an ensemble): read as it is
        cache = OfflineLabelCache.from_folder(request.cache)
        logger.info(f"offline pseudo-labels: {cache.folder} (given by method.offline_cache)")
    else:
        # The recipe's settings (what the confidence channel holds) key the cache, with the model and the data.
        fingerprint = model_fingerprint(model, extra={
            "scales": list(request.scales), "resize": d.resize, "target": d.target, "synthetic": d.synthetic,
            **request.options, **(fingerprint_extra or {})})
        cache = OfflineLabelCache(Path(d.cache_dir) if d.cache_dir else default_cache_dir(), fingerprint=fingerprint)
        if is_main:
            logger.info(f"offline pseudo-labels: {cache.folder} (model {fingerprint[:12]})")
            build_offline_labels(model, base, cache, device=device, batch_size=d.val_batch_size,
                                 scales=tuple(request.scales), amp=amp, num_workers=d.num_workers,
                                 progress=progress, **request.options)
    barrier()
    return WithOfflineLabels(base, cache, transform=train_tf), WithOfflineLabels(base, cache)


def run_adapt(cfg: AdaptConfig) -> Path:
    """Adapt, evaluate on ``data.val`` / ``data.val_extra`` when given, and return the path of ``model.ckpt``."""
    method_cfg = cfg.method_config()
    cfg = replace(cfg, method=to_dict(method_cfg))  # the resolved config records every recipe default
    dist_info, device = init_distributed(cfg.train.device)
    run_dir = Path(cfg.train.out)
    if dist_info.is_main:
        check_run_dir(run_dir, resume=cfg.train.resume)  # an existing run is refused before any work

    def prepare() -> None:
        # The folder is created once the checkpoint and the target data are known to be good, so a typo does not
        # leave a half-made run behind that blocks the corrected command.
        if dist_info.is_main:
            prepare_run_dir(run_dir, cfg=cfg, resume=cfg.train.resume, command="adapt")
        barrier()

    model, info = load_model(cfg.checkpoint, map_location="cpu")
    classes = info.classes
    model.to(device)
    d = cfg.data
    recipe = get_recipe(cfg.recipe)
    train_ds, target_ctx = target_datasets(model, method_cfg.offline_labels(), d, device=device, is_main=dist_info.is_main,
                                           amp=cfg.train.amp, progress=cfg.train.progress, before_labelling=prepare)
    logger.info(f"adapt {cfg.recipe} ({recipe.summary}): {model.name} from {cfg.checkpoint}; target {d.target}: "
                f"{len(train_ds)} images (labels not read); device {device}")
    global_batch = d.batch_size * cfg.train.accumulate * dist_info.world_size
    if len(train_ds) < global_batch:
        logger.warning(f"{d.target}: {len(train_ds)} target image(s), fewer than one batch of {global_batch}: every "
                       f"batch repeats images (the stream cycles through them)")

    torch.manual_seed(cfg.train.seed)  # recipe-owned modules (metric nets, proxies) start the same for a seed
    ctx = AdaptContext(model=model, classes=classes, device=device, export=cfg.export, target=target_ctx,
                       run_dir=run_dir, iters=cfg.train.iters, is_main=dist_info.is_main, batch_size=d.batch_size)
    task = recipe.build(ctx, method_cfg)

    loaders = val_loaders(d, num_classes=classes.num_classes, device=device, owner="the model has")

    config = to_dict(cfg)
    meta = {"recipe": cfg.recipe, "source_checkpoint": str(cfg.checkpoint), "exported": cfg.export}
    hooks = []
    every = cfg.monitor.interval(cfg.train.iters)
    guard = None
    if every >= 0:  # the guard runs on every rank (rank 0 measures and decides), before the final evaluation
        monitor = _build_monitor(cfg, model, classes, device, run_dir, config=config, meta=meta) \
            if dist_info.is_main else None
        guard = MonitorHook(monitor, every=every, on_collapse=cfg.monitor.on_collapse,
                            rollback_to=cfg.monitor.rollback_to,
                            save=lambda path, m: save_model(path, m, classes=classes, config=config, meta=meta),
                            load=lambda path: load_model(path)[0])
        hooks.append(guard)
    if "val" in loaders:
        hooks.append(EvalHook(lambda m: evaluate_model(m, loaders["val"], device=device, eval_cfg=cfg.eval).to_dict()))
    trainer = Trainer(task, train_ds, train_cfg=cfg.train, optim_cfg=cfg.optim, batch_size=d.batch_size,
                      num_workers=d.num_workers, device=device, dist_info=dist_info, run_dir=run_dir,
                      hooks=hooks, config=config, collate_fn=collate,
                      save_model=lambda path, m: save_model(path, m, classes=classes, config=config,
                                                             meta={**meta, **_delivery(guard)}))
    path = trainer.train(resume=cfg.train.resume)
    delivered = trainer.delivered_model()
    if dist_info.is_main:
        # Models a recipe trains beside the delivered one (duda's large teacher): RUN/<name>.ckpt each, written
        # after model.ckpt and atomically like it, so a later `distill` or `evaluate` can use them.
        for name, net in task.extra_exports().items():
            save_model(run_dir / f"{name}.ckpt", net, classes=classes, config=config, meta={**meta, "exported": name})

    results = evaluate_extra(delivered, loaders, device=device, eval_cfg=cfg.eval, run_dir=run_dir,
                             is_main=dist_info.is_main)
    if dist_info.is_main:
        _write_metrics(run_dir, guard, results)
    if cfg.report and dist_info.is_main:
        report = _write_report(cfg, delivered, classes, device, run_dir, loaders, results,
                               guard=guard.state if guard is not None else None)
        logger.info(f"report: {report}")
    return path


def _delivery(guard: MonitorHook | None) -> dict:
    """What the checkpoint's meta says about the collapse guard's choice (read when the model is saved)."""
    if guard is None:
        return {}
    return {"delivered_step": guard.state["delivered_step"], "rolled_back": guard.state["rolled_back"]}


def _write_metrics(run_dir: Path, guard: MonitorHook | None, extra: dict) -> None:
    """RUN/metrics.json: the final evaluation (when a labelled split was given) and the collapse guard's record."""
    metrics: dict = {}
    if (run_dir / "eval.json").exists():
        metrics["val"] = json.loads((run_dir / "eval.json").read_text())
    if extra:
        metrics["val_extra"] = extra
    if guard is not None:
        metrics["guard"] = guard.state
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))


@torch.no_grad()
def _write_report(cfg: AdaptConfig, adapted, classes, device, run_dir: Path, loaders: dict, extra_results: dict,
                  guard: dict | None = None):
    """report.md / report.html: the source model is reloaded to show before vs after on the same images."""
    d = cfg.data
    source = load_model(cfg.checkpoint, map_location="cpu")[0].to(device).eval()
    was_training = adapted.training
    adapted.eval()
    if "val" in loaders:  # labelled examples when there is a labelled split, else target images only
        ds = loaders["val"].dataset
    else:
        ds = dataset_from_spec(d.target, with_labels=False, transform=build_eval_transform(resize=d.resize),
                               on_error=d.on_error, synthetic=d.synthetic)
    samples = [ds[i] for i in range(min(4, len(ds)))]
    samples = [s for s in samples if tuple(s["image"].shape) == tuple(samples[0]["image"].shape)]
    images = torch.stack([s["image"] for s in samples])
    labels = torch.stack([s["mask"] for s in samples]) if "mask" in samples[0] else None
    x = to_model_input(images.to(device))
    preds, maps = {}, {}
    for name, m in (("source-only", source), ("adapted", adapted)):
        probs = torch.softmax(resize_logits(m(x), tuple(x.shape[-2:])).float(), dim=1)
        preds[name] = probs.argmax(1).cpu()
        maps[f"{name} confidence"] = probs.max(1).values.cpu()
    per_class = None
    eval_json = run_dir / "eval.json"
    if "val" in loaders and eval_json.exists():
        per_class = {"source-only": evaluate_model(source, loaders["val"], device=device, eval_cfg=cfg.eval).to_dict(),
                     "adapted": json.loads(eval_json.read_text())}
    extra = {name: {"source-only": evaluate_model(source, loaders[name], device=device,
                                                  eval_cfg=cfg.eval).to_dict()["miou"],
                    "adapted": r["miou"]} for name, r in extra_results.items()}
    adapted.train(was_training)
    return write_adapt_report(run_dir, recipe=cfg.recipe, classes=classes, predictions=preds, images=images,
                              labels=labels, maps=maps, per_class=per_class, extra=extra or None, guard=guard)



def _build_monitor(cfg: AdaptConfig, model, classes, device, run_dir: Path, *, config: dict, meta: dict):
    """Target-only signals on the first ``monitor.images`` target images (no label is read)."""
    d, m = cfg.data, cfg.monitor
    ds = dataset_from_spec(d.target, with_labels=False, transform=build_eval_transform(resize=d.resize),
                           on_error=d.on_error, synthetic=d.synthetic)
    images = [ds[i]["image"] for i in range(min(m.images, len(ds)))]
    save = None
    if m.keep_checkpoints:
        def save(path, net):
            save_model(path, net, classes=classes, config=config, meta=meta)
    return TargetMonitor(images, source_model=model, num_classes=classes.num_classes, class_names=classes.names,
                         tau=m.tau, snd_pixels=m.snd_pixels, batch_size=m.batch_size, device=device,
                         run_dir=run_dir, save_snapshot=save)
