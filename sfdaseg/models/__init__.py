"""Segmentation models: ``build_model(name, *, num_classes, weights=None, **options)`` and the ``MODELS`` dict.

Every model is a :class:`SegmentationModel` (see ``base.py`` for the contract: float RGB ``[0, 1]`` input,
logits at ``1 / output_stride``, ``extract`` / ``classify``, ``param_groups``, ``build_args``). Checkpoints:
:func:`save_model` and :func:`load_model` (the file format is :mod:`sfdaseg.storage`).
"""

from sfdaseg.models.base import SegmentationModel, WeightsError, load_weights, unwrap_model
from sfdaseg.models.checkpoint import load_model, save_model
from sfdaseg.models.factory import MODELS, build_model, model_options
from sfdaseg.normalization import CAFFE, IMAGENET, NORMALIZATIONS, Normalization

__all__ = [
    "CAFFE",
    "IMAGENET",
    "MODELS",
    "NORMALIZATIONS",
    "Normalization",
    "SegmentationModel",
    "WeightsError",
    "build_model",
    "load_model",
    "load_weights",
    "model_options",
    "save_model",
    "unwrap_model",
]
