"""Supervised training on labelled (source) data: the task behind ``sfdaseg train-source``."""

from __future__ import annotations

import torch.nn as nn

from sfdaseg.data.transforms import to_model_input
from sfdaseg.losses import seg_cross_entropy
from sfdaseg.task import StepOutput, TaskBase, WrapFn


class SupervisedSegmentation(TaskBase):
    """Pixel-wise cross-entropy on labelled batches.

    Batch: ``image`` uint8 ``(B, 3, H, W)``, ``mask`` uint8 ``(B, H, W)`` on the training device.
    """

    def __init__(self, model: nn.Module, *, ignore_index: int = 255) -> None:
        self.model = model
        self.ignore_index = ignore_index
        self._net: nn.Module = model

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def wrap_trainable(self, wrap: WrapFn) -> None:
        self._net = wrap("model", self.model)

    def training_step(self, batch: dict, step: int) -> StepOutput:
        logits = self._net(to_model_input(batch["image"]))
        loss = seg_cross_entropy(logits, batch["mask"], ignore_index=self.ignore_index)
        return StepOutput(loss=loss, logs={"loss_ce": loss.detach()})

    def export_model(self) -> nn.Module:
        return self.model
