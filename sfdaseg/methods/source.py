"""Supervised training on labelled (source) data: the task behind ``sfdaseg train-source``."""

from __future__ import annotations

import torch
import torch.nn as nn

from sfdaseg.data.transforms import to_model_input
from sfdaseg.losses import ohem_cross_entropy, seg_cross_entropy
from sfdaseg.task import StepOutput, TaskBase, WrapFn


class SupervisedSegmentation(TaskBase):
    """Pixel-wise cross-entropy on labelled batches, with the usual tools for imbalanced classes.

    Batch: ``image`` uint8 ``(B, 3, H, W)``, ``mask`` uint8 ``(B, H, W)`` on the training device.

    Args:
        class_weight: optional ``(C,)`` CE weights (the loss stays the mean over labelled pixels, so a rare class's
            weight raises its share).
        ohem: online hard example mining (:func:`sfdaseg.losses.ohem_cross_entropy`) with ``ohem_thresh`` and
            ``ohem_min_kept`` (None: a fifth of the batch's pixels).
        aux_weight: weight of the auxiliary head's CE when the model has one (``model.aux_head``); the auxiliary
            head gets the same loss (weights, OHEM) at its own resolution, upsampled.
    """

    def __init__(self, model: nn.Module, *, ignore_index: int = 255, class_weight: torch.Tensor | None = None,
                 ohem: bool = False, ohem_thresh: float = 0.7, ohem_min_kept: int | None = None,
                 aux_weight: float = 0.4) -> None:
        self.model = model
        self.ignore_index = ignore_index
        self.class_weight = class_weight
        self.ohem, self.ohem_thresh, self.ohem_min_kept = ohem, ohem_thresh, ohem_min_kept
        self.aux = getattr(model, "aux_head", None) is not None
        self.aux_weight = aux_weight
        self._net: nn.Module = model

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def wrap_trainable(self, wrap: WrapFn) -> None:
        self._net = wrap("model", self.model)

    def _loss(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.ohem:
            kept = self.ohem_min_kept if self.ohem_min_kept is not None else max(1, mask.numel() // 5)
            return ohem_cross_entropy(logits, mask, thresh=self.ohem_thresh, min_kept=kept,
                                      ignore_index=self.ignore_index, class_weight=self.class_weight)
        return seg_cross_entropy(logits, mask, ignore_index=self.ignore_index, class_weight=self.class_weight)

    def training_step(self, batch: dict, step: int) -> StepOutput:
        x, mask = to_model_input(batch["image"]), batch["mask"]
        if not self.aux:
            loss = self._loss(self._net(x), mask)
            return StepOutput(loss=loss, logs={"loss_ce": loss.detach()})
        logits, aux = self._net(x, return_aux=True)
        loss_ce, loss_aux = self._loss(logits, mask), self._loss(aux, mask)
        return StepOutput(loss=loss_ce + self.aux_weight * loss_aux,
                          logs={"loss_ce": loss_ce.detach(), "loss_aux": loss_aux.detach()})

    def export_model(self) -> nn.Module:
        return self.model
