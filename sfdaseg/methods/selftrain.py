"""``selftrain``: the mean-teacher self-training baseline, made source-free (the DAFormer-style reference point).

Per step, on a batch of unlabelled target crops ``x`` (the weak view):

1. the EMA teacher labels ``x``: probabilities ``p``, confidence ``max p``, label ``argmax p`` (crop padding is
   never labelled);
2. a selection policy turns them into labels and pixel weights (default: class-balanced, the top ``percentile``
   % most confident pixels of each class against a running per-class confidence histogram over many batches
   and all ranks, :class:`sfdaseg.class_stats.RunningClassHistogram`; or DAFormer's confidence-ratio weight:
   every pixel kept, each image weighted by the fraction of its pixels with confidence above ``tau`` = 0.968;
   or a fixed threshold, or nothing);
3. the strong view (:mod:`sfdaseg.strong_view`): style swap (default: the Fourier amplitude of another target
   image for every image), photometric augmentation, ClassMix between target images (labels and weights move
   with the pixels);
4. loss = mean of ``w * CE`` of the student on the strong view over the labelled pixels (the confidence-ratio
   weight scales the loss, as in DAFormer) + the collapse-prevention terms (:mod:`sfdaseg.regularizers`: class
   prior, anchor to the frozen source); the teacher follows the student by EMA (momentum 0.999 with the
   ``1 - 1/(t+1)`` warm-up).

Published values (DAFormer, Hoyer et al. 2022): tau 0.968, EMA 0.999, ClassMix, colour jitter + blur. What is
ours: the source-free setting (no source batch, target-to-target ClassMix), the default selection and style
swap (chosen on the val splits of both benchmarks), the running class statistics, the collapse-prevention terms
(off by default: measured, they do not help at the default learning rate and hide a collapse from the guard at
a high one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sfdaseg.class_stats import RunningClassHistogram
from sfdaseg.config_base import choices, param
from sfdaseg.data.transforms import to_model_input
from sfdaseg.losses import resize_logits, seg_cross_entropy
from sfdaseg.methods.common import (AdaptContext, RecipeConfig, TeacherStudentTask, ignore_padding, valid_pixels,
                                    warn_batch_level_parts)
from sfdaseg.models.ema import EMATeacher
from sfdaseg.pseudo_labels import POLICIES, pseudo_label_stats, select_pseudo_labels, softmax_confidence
from sfdaseg.regularizers import CollapseConfig, SourceRegularizer
from sfdaseg.strong_view import StrongView, StrongViewConfig
from sfdaseg.style import STYLE_KINDS
from sfdaseg.task import StepOutput


@dataclass
class SelfTrainConfig(CollapseConfig, StrongViewConfig, RecipeConfig):
    ema_momentum: float = param(0.999, ge=0.0, lt=1.0, origin="published", help="EMA teacher momentum (DAFormer)")
    # The shipped defaults (class-balanced selection, a Fourier style swap of every student image) were chosen
    # on the val splits of both benchmarks over DAFormer's ratio weight and no style (benchmarks/results/).
    style: str = choices(*STYLE_KINDS, default="fourier", origin="ours",
                         help="intra-domain style swap of the student's view")
    style_p: float = param(1.0, ge=0.0, le=1.0, origin="ours", help="probability that an image is re-styled")
    policy: str = choices(*POLICIES, default="class_balanced", origin="ours",
                          help="pseudo-label selection / weighting (class_balanced: top p% of each class, CBST-style, "
                               "running statistics; ratio: DAFormer's confidence-ratio weight)")
    tau: float = param(0.968, ge=0.0, le=1.0, origin="published", help="confidence threshold (DAFormer)")
    percentile: float = param(50.0, gt=0.0, le=100.0,
                              help="class_balanced: keep the top p% most confident pixels of each class")
    stats_momentum: float = param(0.99, ge=0.0, lt=1.0,
                                  help="class_balanced: memory of the running per-class confidence histogram")


class SelfTraining(TeacherStudentTask):
    def __init__(self, ctx: AdaptContext, cfg: SelfTrainConfig) -> None:
        super().__init__(ctx.model, EMATeacher(ctx.model, momentum=cfg.ema_momentum), export=ctx.export)
        self.cfg = cfg
        self.num_classes = ctx.classes.num_classes
        self.ignore = ctx.classes.ignore_index
        self.view = StrongView(cfg, num_classes=self.num_classes, ignore_index=self.ignore)
        self.hist = RunningClassHistogram(self.num_classes, momentum=cfg.stats_momentum).to(ctx.device)
        self.reg = SourceRegularizer(cfg, source=ctx.model, target=ctx.target, num_classes=self.num_classes,
                                     device=ctx.device)
        warn_batch_level_parts(cfg, ctx.batch_size, "selftrain")

    def state_dict(self):
        return {**super().state_dict(), "hist": self.hist.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.hist.load_state_dict(state["hist"])

    def training_step(self, batch: dict, step: int) -> StepOutput:
        cfg = self.cfg
        x = to_model_input(batch["image"])  # (B, 3, H, W) weak view
        size = tuple(x.shape[-2:])
        valid = valid_pixels(batch)
        with torch.no_grad():
            _, conf, label = softmax_confidence(resize_logits(self.teacher(x), size))
            label = ignore_padding(label, batch, self.ignore)
            if cfg.policy == "class_balanced":  # percentiles of the running histogram, not of this batch
                self.hist.update(conf, label)
                label, weight = self.hist.select(conf, label, percentile=cfg.percentile, ignore_index=self.ignore)
            else:
                label, weight = select_pseudo_labels(cfg.policy, conf, label, num_classes=self.num_classes,
                                                     tau=cfg.tau, percentile=cfg.percentile,
                                                     ignore_index=self.ignore)
            stats = pseudo_label_stats(label, conf, num_classes=self.num_classes, ignore_index=self.ignore)
            maps = [m for m in (self.reg.source_probs(x), None if valid is None else valid.float()) if m is not None]
            xs, label, weight, *maps = self.view(x, label, weight, *maps)
            src = maps.pop(0) if self.reg.source is not None else None
            valid = maps.pop(0) > 0.5 if valid is not None else None
        logits = self.net(xs)
        # mean(w * CE) over the labelled pixels: DAFormer's confidence-ratio weight scales the loss (a per-image
        # constant would cancel in a weighted mean); 0/1 selections give the plain mean over the kept pixels.
        loss_st = seg_cross_entropy(logits, label, ignore_index=self.ignore, pixel_weight=weight, normalize="valid")
        loss_reg, reg_logs = self.reg.loss(logits, src, valid=valid) if self.reg.active else (0.0, {})
        return StepOutput(loss_st + loss_reg, {"loss_st": loss_st.detach(), **reg_logs,
                                               **{f"pl/{k}": v for k, v in stats.items()}})


def build(ctx: AdaptContext, cfg: SelfTrainConfig) -> SelfTraining:
    return SelfTraining(ctx, cfg)
