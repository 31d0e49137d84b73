"""UniSFDA's stages in one command: ``sfdaseg adapt --config FILE`` where FILE has a ``stages:`` section.

Why a section of the adapt config (and not a new command or a second recipe): every stage *is* an adapt run
of the ``unisfda`` recipe, so the pipeline takes the adapt config as it is: ``data``, ``optim``, ``train``,
``eval``, ``monitor`` and ``method`` are shared by all stages, each stage may change any of them with
``key=value`` overrides, and ``checkpoint`` names the source model of the **final, efficient** model (what the
command delivers, as for any adapt run). ``stages`` (typed by :class:`sfdaseg.config.PipelineConfig`) adds
what only the pipeline needs::

    recipe: unisfda
    checkpoint: small_source.ckpt            # stage 2 starts here
    train: {out: runs/unisfda, iters: 400}   # OUT; shared defaults of every stage
    stages:
      aux:                                   # stage 1: one unisfda run per auxiliary model, any architecture
        - {name: deeplab, checkpoint: deeplabv2_source.ckpt, overrides: [optim.lr=2.5e-4]}
        - {name: segformer, checkpoint: segformer_b5_source.ckpt}
      ensemble: {mc_passes: 8, measure: entropy, weighting: certainty}
      student: {overrides: [train.iters=800]}

Layout of ``OUT`` (``train.out``)::

    OUT/config.yaml                 the resolved pipeline config
    OUT/stage1_<name>/              one adapt run per auxiliary model (model.ckpt: the adapted model)
    OUT/ensemble/cache/<fp[:16]>/   the fused labels + certainty (an offline-label cache keyed by every
                                    adapted model's fingerprint and the ensemble settings)
    OUT/ensemble/manifest.json      the models, their fingerprints, the settings and the cache folder
    OUT/stage2/                     the efficient model's adapt run: OUT/stage2/model.ckpt is the result

Stage 2 is the ``unisfda`` recipe with ``method.offline_cache`` = the ensemble's cache: its "offline" labels are
the ensemble's, and the EMA teacher of the efficient model fills in where the ensemble is uncertain (see
:mod:`sfdaseg.methods.unisfda`); with ``method.kd_weight > 0`` in the student's overrides it also learns the
ensemble's soft prediction, computed online from the adapted auxiliary models.

**Resume.** Like any run, a second call with the same ``OUT`` is refused unless ``train.resume=true``
(``--resume``). Then every finished stage (its ``model.ckpt`` exists) is reused as it is, an interrupted stage
is resumed from its ``state.pt`` (the trainer's resume), a finished ensemble (manifest of the same
fingerprint, every entry present) is reused and an interrupted one completes its missing entries. A stage
folder whose recorded config differs from what the stage would run now (another checkpoint, recipe settings,
optimiser, iterations, data) is refused with the differing keys named: delete that folder to redo it.

The final checkpoint's path is returned (the CLI prints it as the last line of stdout).
"""

from __future__ import annotations

import logging
import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from sfdaseg.config import (AdaptConfig, ConfigError, PipelineEnsembleConfig, from_dict, merge, nest,
                            parse_override, to_dict)
from sfdaseg.data.transforms import build_eval_transform
from sfdaseg.distill import check_same_classes, load_teachers
from sfdaseg.engine.distributed import barrier, init_distributed
from sfdaseg.engine.rundir import CONFIG_FILE, prepare_run_dir
from sfdaseg.engine.trainer import MODEL_FILE, STATE_FILE
from sfdaseg.methods.unisfda import EnsembleLabeller
from sfdaseg.offline_labels import OfflineLabelCache, build_offline_labels, model_fingerprint
from sfdaseg.runs.adapt import run_adapt
from sfdaseg.runs.common import dataset_from_spec
from sfdaseg.storage import atomic_write_text, read_checkpoint_info

logger = logging.getLogger(__name__)

__all__ = ["ENSEMBLE_MANIFEST", "run_pipeline", "stage_config"]

ENSEMBLE_MANIFEST = "manifest.json"
_ENSEMBLE_FORMAT = "sfdaseg-unisfda-ensemble"
# What must match between a stage folder's recorded config and the stage about to run for the folder to be
# reused or resumed (evaluation, logging and device settings may change freely).
_STAGE_KEYS = ("recipe", "checkpoint", "export", "method", "optim", "train.iters", "train.seed", "train.accumulate",
               "data.target", "data.resize", "data.scale_range", "data.crop", "data.hflip", "data.batch_size",
               "data.synthetic")


def stage_config(base: AdaptConfig, *, out: Path, checkpoint: str | Path, overrides: list[str], where: str,
                 kd_teachers: list[str] | None = None) -> AdaptConfig:
    """The adapt config of one stage: ``base`` without ``stages``, with its own ``checkpoint`` and ``train.out``,
    then the stage's ``key=value`` ``overrides``; validated (errors are prefixed with ``where``).

    ``kd_teachers`` fill ``method.kd_teachers`` when the stage asks for distillation (``method.kd_weight > 0``)
    without naming its teachers.
    """
    data = to_dict(base)
    data["stages"] = {}
    data["checkpoint"] = str(checkpoint)
    data["train"]["out"] = str(out)
    try:
        if overrides:
            layer = nest(dict(parse_override(o) for o in overrides))
            from_dict(AdaptConfig, layer, source=where, validate=False)  # names the stage when a key is wrong
            data = merge(data, layer)
        method = data["method"]
        if kd_teachers and float(method.get("kd_weight") or 0.0) > 0 and not method.get("kd_teachers"):
            method["kd_teachers"] = list(kd_teachers)
        cfg = from_dict(AdaptConfig, data, source=where)  # validated, the recipe's method section included
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg


def _get(d: Any, key: str) -> Any:
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _check_stage_folder(folder: Path, cfg: AdaptConfig, label: str) -> None:
    """Refuse to reuse or resume a stage folder that was run with other settings."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        return
    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{label}: cannot read {path} ({e}); delete {folder} to run this stage again") from None
    now = to_dict(replace(cfg, method=to_dict(cfg.method_config())))  # run_adapt records the resolved method
    differ = [k for k in _STAGE_KEYS if _get(saved, k) != _get(now, k)]
    if differ:
        raise ConfigError(f"{label}: {folder} was run with other settings ({', '.join(differ)} differ); delete "
                          f"that folder to redo the stage, or restore the settings")


def _run_stage(cfg: AdaptConfig, label: str) -> Path:
    """Reuse a finished stage, resume an interrupted one, or run it; returns its ``model.ckpt``."""
    folder = Path(cfg.train.out)
    started = any((folder / f).exists() for f in (CONFIG_FILE, STATE_FILE, MODEL_FILE))
    if started:
        _check_stage_folder(folder, cfg, label)
    if (folder / MODEL_FILE).is_file():
        logger.info(f"{label}: finished earlier; reusing {folder / MODEL_FILE}")
        return folder / MODEL_FILE
    logger.info(f"{label}: {'resuming the interrupted run in' if started else 'running in'} {folder}")
    return run_adapt(replace(cfg, train=replace(cfg.train, resume=started)))


def _ensemble_fingerprint(fingerprints: list[str], settings: dict[str, Any]) -> str:
    text = json.dumps({"format": _ENSEMBLE_FORMAT, "models": fingerprints, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _ensemble_stage(out: Path, members: list[tuple[str, Path]], student: AdaptConfig, ens: PipelineEnsembleConfig,
                    *, device, is_main: bool) -> Path:
    """Label every target image with the uncertainty-weighted ensemble of the adapted models; returns the cache
    folder (complete on return)."""
    folder = out / "ensemble"
    d = student.data
    models, classes = load_teachers([p for _, p in members], device="cpu")
    check_same_classes(classes, members[0][1], read_checkpoint_info(student.checkpoint).classes, student.checkpoint,
                       what="stages: the auxiliary models and the student")
    fingerprints = [model_fingerprint(m) for m in models]
    settings = {"mc_passes": ens.mc_passes, "measure": ens.measure, "weighting": ens.weighting,
                "resize": d.resize, "target": d.target, "synthetic": d.synthetic}
    fingerprint = _ensemble_fingerprint(fingerprints, settings)
    cache = OfflineLabelCache(folder / "cache", fingerprint=fingerprint)
    manifest_path = folder / ENSEMBLE_MANIFEST
    base = dataset_from_spec(d.target, with_labels=False, transform=build_eval_transform(resize=d.resize),
                             on_error=d.on_error, synthetic=d.synthetic)
    names = getattr(base, "names", None)
    try:
        done = json.loads(manifest_path.read_text()).get("fingerprint") == fingerprint
    except (OSError, ValueError, AttributeError):
        done = False
    if done and names is not None and cache.is_complete(list(names)):
        logger.info(f"ensemble: finished earlier; reusing {cache.folder}")
        return cache.folder
    if is_main:
        logger.info(f"ensemble: {len(models)} adapted models label {len(base)} target images into {cache.folder}")
        labeller = EnsembleLabeller(models, passes=ens.mc_passes, measure=ens.measure, weighting=ens.weighting)
        build_offline_labels(labeller, base, cache, device=device, batch_size=ens.batch_size or d.val_batch_size,
                             amp=student.train.amp, num_workers=d.num_workers, progress=student.train.progress,
                             uncertainty="entropy")
        manifest = {
            "format": _ENSEMBLE_FORMAT, "fingerprint": fingerprint, "cache": str(cache.folder),
            "models": [{"name": n, "checkpoint": str(p), "model": getattr(m, "name", ""), "fingerprint": f}
                       for (n, p), m, f in zip(members, models, fingerprints)],
            "settings": settings, "num_images": len(base),
        }
        # Written last: its presence means the cache is complete.
        atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
    barrier()
    return cache.folder


def run_pipeline(cfg: AdaptConfig) -> Path:
    """Run (or resume) every UniSFDA stage of ``cfg`` (an adapt config with ``stages``); return the final
    ``OUT/stage2/model.ckpt``."""
    pipe = cfg.pipeline_config()
    if cfg.method.get("offline_cache"):
        raise ConfigError("method.offline_cache: the pipeline sets it for stage 2 (the ensemble's labels); remove it")
    dist_info, device = init_distributed(cfg.train.device)
    out = Path(cfg.train.out)
    auxes = pipe.aux_configs()
    for i, a in enumerate(auxes):
        if not Path(a.checkpoint).expanduser().is_file():
            raise ConfigError(f"stages.aux[{i}].checkpoint: no such file: {a.checkpoint}")
    # Every stage's config is built (and checked) before any work starts: a typo in stage 2 fails now.
    aux_cfgs = [(a.name, stage_config(cfg, out=out / f"stage1_{a.name}", checkpoint=a.checkpoint,
                                      overrides=a.overrides, where=f"stages.aux[{i}] ({a.name})"))
                for i, a in enumerate(auxes)]
    student = stage_config(cfg, out=out / "stage2", checkpoint=cfg.checkpoint, overrides=pipe.student.overrides,
                           where="stages.student",
                           kd_teachers=[str(out / f"stage1_{name}" / MODEL_FILE) for name, _ in aux_cfgs])
    if dist_info.is_main:
        prepare_run_dir(out, cfg=cfg, resume=cfg.train.resume, command="adapt")
    barrier()

    members = [(name, _run_stage(c, f"stage 1 ({name})")) for name, c in aux_cfgs]
    cache = _ensemble_stage(out, members, student, pipe.ensemble, device=device, is_main=dist_info.is_main)
    final = _run_stage(replace(student, method={**student.method, "offline_cache": str(cache)}), "stage 2 (student)")
    logger.info(f"unisfda pipeline: stage 1 {', '.join(str(p) for _, p in members)}; ensemble {cache}; final {final}")
    return final
