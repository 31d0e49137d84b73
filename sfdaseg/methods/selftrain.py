"""``selftrain``: the mean-teacher self-training baseline, made source-free (the DAFormer-style reference point).

Per step, on a batch of unlabelled target crops ``x`` (the weak view):

1. the EMA teacher labels ``x``: probabilities ``p``, confidence ``max p``, label ``argmax p``;
2. a selection policy turns them into labels and pixel weights (default DAFormer's confidence-ratio weight:
   every pixel kept, each image weighted by the fraction of its pixels with confidence above ``tau`` = 0.968;
   or a fixed threshold, class-balanced percentiles, or nothing);
3. the strong view: batched photometric augmentation on the device, then ClassMix between target images
   (labels and weights move with the pixels);
4. loss = weighted cross-entropy of the student on the strong view; the teacher follows the student by EMA
   (momentum 0.999 with the ``1 - 1/(t+1)`` warm-up).

Published values (DAFormer, Hoyer et al. 2022): tau 0.968, EMA 0.999, ClassMix, colour jitter + blur. What is
ours: the source-free setting (no source batch, target-to-target ClassMix).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sfdaseg.config_base import choices
from sfdaseg.data.transforms import to_model_input
from sfdaseg.losses import resize_logits, seg_cross_entropy
from sfdaseg.methods.common import AdaptContext, RecipeConfig, TeacherStudentTask
from sfdaseg.models.ema import EMATeacher
from sfdaseg.pseudo_labels import POLICIES, pseudo_label_stats, select_pseudo_labels, softmax_confidence
from sfdaseg.strong_view import StrongView, StrongViewConfig
from sfdaseg.task import StepOutput


@dataclass
class SelfTrainConfig(StrongViewConfig, RecipeConfig):
    ema_momentum: float = 0.999
    policy: str = choices(*POLICIES, default="ratio", help="pseudo-label selection / weighting")
    tau: float = 0.968  # confidence threshold (DAFormer)
    percentile: float = 50.0  # class_balanced: keep the top p% most confident pixels of each class


class SelfTraining(TeacherStudentTask):
    def __init__(self, ctx: AdaptContext, cfg: SelfTrainConfig) -> None:
        super().__init__(ctx.model, EMATeacher(ctx.model, momentum=cfg.ema_momentum), export=ctx.export)
        self.cfg = cfg
        self.num_classes = ctx.classes.num_classes
        self.ignore = ctx.classes.ignore_index
        self.view = StrongView(cfg, num_classes=self.num_classes, ignore_index=self.ignore)

    def training_step(self, batch: dict, step: int) -> StepOutput:
        cfg = self.cfg
        x = to_model_input(batch["image"])  # (B, 3, H, W) weak view
        size = tuple(x.shape[-2:])
        with torch.no_grad():
            _, conf, label = softmax_confidence(resize_logits(self.teacher(x), size))
            label, weight = select_pseudo_labels(cfg.policy, conf, label, num_classes=self.num_classes,
                                                 tau=cfg.tau, percentile=cfg.percentile, ignore_index=self.ignore)
            stats = pseudo_label_stats(label, conf, num_classes=self.num_classes, ignore_index=self.ignore)
            xs, label, weight = self.view(x, label, weight)
        loss = seg_cross_entropy(self.net(xs), label, ignore_index=self.ignore, pixel_weight=weight)
        return StepOutput(loss, {"loss_st": loss.detach(), **{f"pl/{k}": v for k, v in stats.items()}})


def build(ctx: AdaptContext, cfg: SelfTrainConfig) -> SelfTraining:
    return SelfTraining(ctx, cfg)
