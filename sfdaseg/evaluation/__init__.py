"""Evaluation: device-side confusion matrix, metrics, test-time inference modes and ``evaluate``.

All scores are percentages (0-100).
"""

from sfdaseg.evaluation.evaluate import evaluate
from sfdaseg.evaluation.inference import predict, predict_logits
from sfdaseg.evaluation.metrics import ConfusionMatrix, SegMetrics, resolve_protocol

__all__ = [
    "ConfusionMatrix",
    "SegMetrics",
    "evaluate",
    "predict",
    "predict_logits",
    "resolve_protocol",
]
