"""Segmentation models: ``build_model(name, *, num_classes, weights=None, **options)`` and the ``MODELS`` dict.

Every model is a :class:`SegmentationModel` (see ``base.py`` for the contract: float RGB ``[0, 1]`` input,
logits at ``1 / output_stride``, ``extract`` / ``classify``, ``param_groups``, ``build_args``).
"""

from sfdaseg.models.base import (
    CAFFE,
    IMAGENET,
    NORMALIZATIONS,
    Normalization,
    SegmentationModel,
    WeightsError,
    load_weights,
)
from sfdaseg.models.factory import MODELS, build_model, model_options

__all__ = [
    "CAFFE",
    "IMAGENET",
    "MODELS",
    "NORMALIZATIONS",
    "Normalization",
    "SegmentationModel",
    "WeightsError",
    "build_model",
    "load_weights",
    "model_options",
]
