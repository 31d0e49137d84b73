"""Model checkpoints: :func:`save_model` writes a :class:`SegmentationModel` in the library's one format,
:func:`load_model` rebuilds it from the registry and loads its weights strictly.

The format itself (header, atomic writes, weights-only reads) is :mod:`sfdaseg.storage`, below the models; this
module is where a model meets it, because rebuilding one needs the registry (:func:`build_model`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from sfdaseg.data.classes import ClassSpec
from sfdaseg.models.base import SegmentationModel, WeightsError, unwrap_model
from sfdaseg.models.factory import build_model
from sfdaseg.storage import CheckpointError, CheckpointInfo, safe_load, to_plain, write_checkpoint

__all__ = ["load_model", "save_model"]


def _library_versions(model: SegmentationModel) -> dict[str, str]:
    versions = {"torch": str(torch.__version__)}  # TorchVersion is a str subclass: not plain data
    try:
        from importlib.metadata import version

        versions["sfdaseg"] = version("sfdaseg")
    except Exception:  # noqa: BLE001 - not installed (running from a checkout)
        pass
    if model.name.startswith("segformer"):
        import transformers

        versions["transformers"] = str(transformers.__version__)
    return versions


def save_model(
    path: str | Path,
    model: nn.Module,
    *,
    classes: ClassSpec | Mapping,
    config: Mapping | None = None,
    meta: Mapping | None = None,
    format: str | None = None,  # noqa: A002 - the natural name for the file format
) -> Path:
    """Write a model checkpoint atomically; returns the path written.

    Args:
        path: destination; ``format`` defaults to ``"safetensors"`` for a ``.safetensors`` suffix, else ``"pt"``.
        model: a :class:`SegmentationModel` (DDP / ``torch.compile`` wrappers are unwrapped).
        classes: the class spec of the model's output channels (``C`` names).
        config: the resolved run config (plain data).
        meta: anything else plain (step, metrics); library versions are added under ``"saved_with"``.
        format: ``"pt"`` or ``"safetensors"``; with ``"safetensors"`` the suffix becomes ``.safetensors``.
    """
    path = Path(path).expanduser()
    model = unwrap_model(model)
    if not isinstance(model, SegmentationModel):
        raise TypeError(f"save_model: expected a SegmentationModel, got {type(model).__name__}")
    if not isinstance(classes, ClassSpec):
        classes = ClassSpec.from_dict(classes)
    if classes.num_classes != model.num_classes:
        raise ValueError(
            f"save_model({path}): the class spec has {classes.num_classes} classes but model "
            f"{model.name!r} outputs {model.num_classes}"
        )
    if format not in (None, "pt", "safetensors"):
        raise ValueError(f"save_model: format must be 'pt' or 'safetensors', got {format!r}")
    meta_plain = to_plain(dict(meta or {}), "meta")
    meta_plain.setdefault("saved_with", _library_versions(model))
    header = {
        "model": {"name": model.name, "build_args": to_plain(model.build_args, "model.build_args")},
        "classes": classes.to_dict(),
        "normalization": model.normalization.to_dict(),
        "config": to_plain(dict(config), "config") if config is not None else None,
        "meta": meta_plain,
    }
    state = {k: v.detach().cpu() for k, v in model.checkpoint_state_dict().items()}
    return write_checkpoint(path, header, state, format=format)


def load_model(
    path: str | Path,
    *,
    map_location: Any = "cpu",
    num_classes: int | None = None,
    name: str | None = None,
) -> tuple[SegmentationModel, CheckpointInfo]:
    """Rebuild a model from a checkpoint (``.pt`` or ``.safetensors``) and load its weights strictly.

    The architecture is rebuilt with ``build_model(name, **build_args)`` (nothing is downloaded). The model is
    returned in eval mode on ``map_location``.

    Args:
        num_classes, name: when given, the checkpoint must match them (error naming the file and both values).
    """
    path = Path(path).expanduser()
    obj = safe_load(path, "cpu")
    info = CheckpointInfo.from_checkpoint(obj, path=path)
    if name is not None and name != info.name:
        raise CheckpointError(f"{path} holds model {info.name!r}, but model {name!r} was expected")
    if num_classes is not None and int(num_classes) != info.num_classes:
        raise CheckpointError(
            f"{path} holds a model with {info.num_classes} classes, but num_classes={num_classes} was expected"
        )
    try:
        model = build_model(info.name, **info.build_args)
    except (ValueError, TypeError) as e:
        raise CheckpointError(
            f"{path}: cannot rebuild model {info.name!r} from build_args {info.build_args}: {e}"
        ) from e
    model.set_normalization(info.normalization)
    try:
        model.load_checkpoint_state_dict(obj["state_dict"], source=path)
    except WeightsError as e:
        raise CheckpointError(str(e)) from e
    model.to(map_location)
    model.eval()
    return model, info
