"""The model registry: ``MODELS`` (a plain dict of builders) and ``build_model``.

Every builder is a keyword-only function ``(*, num_classes, weights=None, **options) -> SegmentationModel``.
``weights`` is always a local path (a file or a Hugging Face folder); nothing is ever downloaded.
"""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Any, Callable

from sfdaseg.models.base import SegmentationModel, WeightsError, check_num_classes, load_weights_from
from sfdaseg.models.deeplabv2 import deeplabv2_r101
from sfdaseg.models.mobilenet import deeplabv3_mobilenet_v3_large, lraspp_mobilenet_v3_large
from sfdaseg.models.segformer import build_segformer
from sfdaseg.models.tiny import tiny
from sfdaseg.storage import CheckpointInfo, is_sfdaseg_checkpoint, safe_load


def _segformer(variant: str) -> Callable[..., SegmentationModel]:
    def builder(
        *,
        num_classes: int,
        weights: str | Path | None = None,
        decoder_hidden_size: int | None = None,
        dropout: float = 0.1,
        drop_path_rate: float = 0.1,
        normalization: Any = "imagenet",
    ) -> SegmentationModel:
        return build_segformer(
            variant,
            num_classes=num_classes,
            weights=weights,
            decoder_hidden_size=decoder_hidden_size,
            dropout=dropout,
            drop_path_rate=drop_path_rate,
            normalization=normalization,
        )

    builder.__name__ = builder.__qualname__ = f"segformer_{variant}"
    builder.__doc__ = f"SegFormer-{variant.upper()} (MiT-{variant.upper()} encoder); see ``build_segformer``."
    return builder


MODELS: dict[str, Callable[..., SegmentationModel]] = {
    "deeplabv2_r101": deeplabv2_r101,
    "segformer_b0": _segformer("b0"),
    "segformer_b1": _segformer("b1"),
    "segformer_b2": _segformer("b2"),
    "segformer_b3": _segformer("b3"),
    "segformer_b4": _segformer("b4"),
    "segformer_b5": _segformer("b5"),
    "lraspp_mobilenet_v3_large": lraspp_mobilenet_v3_large,
    "deeplabv3_mobilenet_v3_large": deeplabv3_mobilenet_v3_large,
    "tiny": tiny,
}


def model_options(name: str) -> dict[str, Any]:
    """The options of a model's builder (besides ``num_classes`` and ``weights``) with their defaults."""
    params = inspect.signature(_builder(name)).parameters
    return {k: p.default for k, p in params.items() if k not in ("num_classes", "weights")}


def _builder(name: str) -> Callable[..., SegmentationModel]:
    try:
        return MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), MODELS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model {name!r}; choices: {', '.join(MODELS)}{hint}") from None


def build_model(
    name: str, *, num_classes: int, weights: str | Path | None = None, **kwargs: Any
) -> SegmentationModel:
    """Build model ``name`` with ``num_classes`` outputs, optionally loading local ``weights``.

    ``weights`` may be an sfdaseg checkpoint (the architecture options saved in it are used unless overridden
    in ``kwargs``; its number of classes must equal ``num_classes``), or a model-specific foreign format (a
    torchvision state dict, a Hugging Face SegFormer folder). ``build_model(model.name, **model.build_args)``
    rebuilds any model's architecture.
    """
    builder = _builder(name)
    options = model_options(name)
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ValueError(
            f"model {name!r} has no option(s) {unknown}; its options are: "
            + ", ".join(f"{k}={v!r}" for k, v in options.items())
        )
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"weights not found: {path} (weights are local files or folders; nothing is downloaded)"
            )
        if path.is_file():
            # Read once: an sfdaseg checkpoint says how to build the architecture, and then fills it.
            obj = safe_load(path)
            if is_sfdaseg_checkpoint(obj):
                info = CheckpointInfo.from_checkpoint(obj, path=path)
                if info.name != name:
                    raise WeightsError(f"{path} is a checkpoint of model {info.name!r}, but model {name!r} was "
                                       "requested")
                check_num_classes(info.num_classes, num_classes, source=path)
                saved = {k: v for k, v in info.build_args.items() if k in options}
                model = builder(num_classes=num_classes, **{**saved, **kwargs})
            else:
                model = builder(num_classes=num_classes, **kwargs)
            load_weights_from(model, obj, source=path)
            return model
    return builder(num_classes=num_classes, weights=weights, **kwargs)
