"""``duda``: adaptation that delivers a lightweight model (DUDA, made source-free).

Three networks (DUDA's structure, published): a **large auxiliary student** (the source checkpoint given by
``checkpoint``), its **EMA teacher** (EMA only between these two, which share one architecture), and a **small
student** that is the deployed model (``method.student``, e.g. ``lraspp_mobilenet_v3_large``, ``segformer_b0``,
or ``tiny`` with a smaller ``width`` on the built-in benchmark). Both students are trained in the one optimizer
(two module groups).

Per step, on a batch of unlabelled target crops ``x`` (the weak view):

1. the teacher(s) label ``x``: the EMA teacher's softmax, averaged with that of every extra adapted checkpoint
   in ``method.teachers`` (multiple teachers, published; equal weights are ours); a selection policy gives one-hot
   pseudo-labels and pixel weights (selftrain's policies and, like selftrain, default class-balanced: ours;
   DUDA follows DAFormer's confidence-ratio weight, ``method.policy=ratio``);
2. the same strong view as ``selftrain`` (by default its Fourier style swap of every image too: ours), batched
   photometric augmentation, then target-to-target ClassMix; the teacher probabilities at temperature ``T`` are
   mixed with the same mask;
3. both students learn from the one-hot pseudo-labels (weighted CE) on the mixed view;
4. the small student also gets **gradual large-to-small distillation**: ``T^2 * KL(p_teacher,T || small_T)``
   whose weight ramps linearly from 0 at step 0 to ``kd_weight`` at ``kd_ramp`` of the schedule (the paper's
   "stage 1 then stage 2" in one run);
5. and the **inconsistency loss**: class weights ``w_c = 1 - IoU_c(small student's argmax, pseudo-labels)``,
   the IoU from running counts over many batches and all ranks (:class:`sfdaseg.class_stats.RunningConfusion`),
   normalised to mean 1 over the classes seen, weight the small student's CE, so the classes it has adapted worst
   count more;
6. plus the collapse-prevention terms (:mod:`sfdaseg.regularizers`) on both students.

Loss = ``large_weight * CE_large + CE_small + inconsistency_weight * CE_small(w_c) + kd_weight * ramp * KD``.

**The small student never starts the main phase from random weights.** Given ``method.student_checkpoint`` (a
small *source* model: the fair setting, both students start from source-trained weights) it starts from it.
Without one it is first **distilled from the frozen source model** on target images for ``small_warmup`` of the
run (KL at temperature ``T``, the large student and its teacher untouched, so the teacher *is* the source model
then), and the gradual large-to-small schedule starts after that warm-up. ``small_warmup`` defaults to ``auto``:
0.25 of the run without a small source checkpoint, 0 with one.

Reconstructed (DUDA's text was not available; the mechanisms are published, these forms are ours, all
configurable): the KL form with ``T^2`` scaling and ``T = 2``; the linear ramp over half the schedule; the
``1 - IoU`` class weights and their normalisation; equal-weight averaging of the teachers; summing stage 1 and
stage 2 into one schedule; the source-distillation warm-up.

Delivered model: the small student (``method.deliver=small``, default), whatever the run-level ``export`` key
says: for DUDA "the student" is ambiguous and the point of the method is the small model.
``method.deliver=large_teacher`` delivers the large EMA teacher instead (e.g. to use it as a teacher of a later
``sfdaseg distill``). The other model is saved too, as ``RUN/large_teacher.ckpt`` (or ``RUN/small_student.ckpt``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sfdaseg.class_stats import RunningClassHistogram, RunningConfusion
from sfdaseg.config_base import ConfigError, choices, param
from sfdaseg.data.classes import IGNORE_INDEX
from sfdaseg.data.transforms import to_model_input
from sfdaseg.distill import average_probs, build_student, check_same_classes, kd_loss, load_teachers, ramp, \
    teacher_logits
from sfdaseg.losses import resize_logits, seg_cross_entropy
from sfdaseg.methods.common import (AdaptContext, RecipeConfig, TeacherStudentTask, ignore_padding, valid_pixels,
                                    warn_batch_level_parts)
from sfdaseg.models import MODELS
from sfdaseg.models.ema import EMATeacher
from sfdaseg.pseudo_labels import POLICIES, pseudo_label_stats, select_pseudo_labels
from sfdaseg.regularizers import CollapseConfig, SourceRegularizer
from sfdaseg.strong_view import StrongView, StrongViewConfig
from sfdaseg.style import STYLE_KINDS
from sfdaseg.task import StepOutput

logger = logging.getLogger(__name__)


@dataclass
class DUDAConfig(CollapseConfig, StrongViewConfig, RecipeConfig):
    student: str | None = param(None, help="small architecture; null: student_checkpoint's, else "
                                           "lraspp_mobilenet_v3_large")
    student_options: dict[str, Any] = param(default_factory=dict, help="its builder options, e.g. {width: 8}")
    student_checkpoint: str | None = param(None, help="a small *source* model (the fair setting); null: the small "
                                                      "student distils from the frozen source first")
    teachers: list[str] = param(default_factory=list, origin="published",
                                help="extra adapted checkpoints averaged with the EMA teacher")
    ema_momentum: float = param(0.999, ge=0.0, lt=1.0, origin="published", help="EMA teacher momentum")
    # selftrain's selection and style swap, not DAFormer's ratio weight without style (DUDA's): chosen on the val
    # splits of both benchmarks with a small source model (benchmarks/results/tuning_val.md, round 5).
    style: str = choices(*STYLE_KINDS, default="fourier", origin="ours",
                         help="intra-domain style swap of the student's view")
    style_p: float = param(1.0, ge=0.0, le=1.0, origin="ours", help="probability that an image is re-styled")
    policy: str = choices(*POLICIES, default="class_balanced", origin="ours",
                          help="pseudo-label selection / weighting (ratio: DAFormer's, as DUDA)")
    tau: float = param(0.968, ge=0.0, le=1.0, origin="published", help="confidence threshold (DAFormer)")
    percentile: float = param(50.0, gt=0.0, le=100.0,
                              help="class_balanced: keep the top p% most confident pixels of each class")
    stats_momentum: float = param(0.99, ge=0.0, lt=1.0,
                                  help="memory of the running class statistics (percentiles, inconsistency IoU)")
    small_warmup: float | None = param(None, ge=0.0, lt=1.0,
                                       help="fraction of the run the small student distils from the frozen source "
                                            "first; null: 0.25 without student_checkpoint, 0 with one")
    large_weight: float = param(1.0, ge=0.0, origin="reconstructed", help="CE weight of the large student")
    temperature: float = param(2.0, gt=0.0, origin="reconstructed", help="T of the large-to-small KL")
    kd_weight: float = param(1.0, ge=0.0, origin="reconstructed", help="KL weight at the end of the ramp")
    kd_ramp: float = param(0.5, ge=0.0, le=1.0, origin="reconstructed",
                           help="fraction of the main phase over which the KL weight rises from 0")
    inconsistency_weight: float = param(1.0, ge=0.0, origin="reconstructed",
                                        help="weight of the small student's 1 - IoU class-weighted CE")
    deliver: str = choices("small", "large_teacher", default="small", help="the model the run delivers")
    schedule_iters: int | None = param(None, ge=1, help="steps the ramp refers to; null: the run's train.iters")
    small_lr_mult: float = param(1.0, gt=0.0, help="the small student's LR = optim.lr * small_lr_mult")

    def validate(self) -> None:
        super().validate()
        if self.student is not None and self.student not in MODELS:
            raise ConfigError(f"method.student: unknown model {self.student!r}; choices: {', '.join(MODELS)}")
        if self.student_checkpoint and not Path(self.student_checkpoint).is_file():
            raise ConfigError(f"method.student_checkpoint: no such file: {self.student_checkpoint}")
        for i, t in enumerate(self.teachers):
            if not Path(t).is_file():
                raise ConfigError(f"method.teachers[{i}]: no such file: {t}")


def inconsistency_class_weights(student_label: Tensor, teacher_label: Tensor, *, num_classes: int,
                                ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Per-class weights ``w_c`` proportional to ``1 - IoU_c(student, teacher)`` on this batch.

    IoU is computed over the pixels the teacher labels (``ignore_index`` excluded). Classes absent from the
    teacher's labels get 0 (no pixel of the CE carries them); the others are scaled to mean 1, so the class-
    weighted CE stays on the scale of the plain CE. Perfect agreement gives all zeros.

    Args:
        student_label: ``(B, H, W)`` integer argmax of the student.
        teacher_label: ``(B, H, W)`` integer pseudo-labels, ``ignore_index`` where dropped.
    Returns:
        ``(C,)`` float32 on the labels' device.
    """
    if student_label.shape != teacher_label.shape:
        raise ValueError(f"inconsistency_class_weights: label shapes differ: {tuple(student_label.shape)} vs "
                         f"{tuple(teacher_label.shape)}")
    c = int(num_classes)
    t = teacher_label.long().reshape(-1)
    s = student_label.long().reshape(-1)
    valid = (t != ignore_index) & (t >= 0) & (t < c)
    t_b = torch.where(valid, t, c)  # bucket c: not counted
    s_b = torch.where(valid & (s >= 0) & (s < c), s, c)
    ones = torch.ones_like(t, dtype=torch.float32)
    n_t = torch.zeros(c + 1, device=t.device).index_add_(0, t_b, ones)[:c]
    n_s = torch.zeros(c + 1, device=t.device).index_add_(0, s_b, ones)[:c]
    tp = torch.zeros(c + 1, device=t.device).index_add_(0, torch.where(s_b == t_b, t_b, c), ones)[:c]
    iou = tp / (n_t + n_s - tp).clamp_min(1.0)
    present = (n_t > 0).float()
    dis = (1.0 - iou) * present
    mean = dis.sum() / present.sum().clamp_min(1.0)
    return dis / mean.clamp_min(1e-6)


def _schedule_iters(ctx: AdaptContext, cfg: DUDAConfig) -> int:
    """The run's length, which the KD ramp refers to: ``method.schedule_iters``, else the run's ``train.iters``."""
    if cfg.schedule_iters:
        return int(cfg.schedule_iters)
    if ctx.iters:
        return int(ctx.iters)
    raise ConfigError("method.schedule_iters: the run's train.iters is not known here; set method.schedule_iters "
                      "to the number of steps the KD ramp refers to")


def iou_class_weights(iou: Tensor, seen: Tensor) -> Tensor:
    """``w_c = 1 - IoU_c`` over the classes ``seen`` ``(C,)`` bool, scaled to mean 1 over them; 0 elsewhere."""
    dis = (1.0 - iou) * seen.float()
    return dis / (dis.sum() / seen.float().sum().clamp_min(1.0)).clamp_min(1e-6)


class DUDA(TeacherStudentTask):
    def __init__(self, ctx: AdaptContext, cfg: DUDAConfig) -> None:
        small = build_student(cfg.student, classes=ctx.classes, checkpoint=cfg.student_checkpoint,
                              options=cfg.student_options, keys=("method.student", "method.student_checkpoint"))
        small.to(ctx.device)
        super().__init__(ctx.model, EMATeacher(ctx.model, momentum=cfg.ema_momentum), export=ctx.export,
                         extra_trainable={"small": small})
        self.small = small
        self.small.lr_mult = cfg.small_lr_mult  # read by the trainer's build_param_groups
        self.small.from_scratch = not cfg.student_checkpoint  # random weights: optim.decay_to=init leaves it alone
        self.cfg = cfg
        self.num_classes = ctx.classes.num_classes
        self.ignore = ctx.classes.ignore_index
        self.view = StrongView(cfg, num_classes=self.num_classes, ignore_index=self.ignore)
        self.hist = RunningClassHistogram(self.num_classes, momentum=cfg.stats_momentum).to(ctx.device)
        self.confusion = RunningConfusion(self.num_classes, momentum=cfg.stats_momentum).to(ctx.device)
        self.reg = SourceRegularizer(cfg, source=ctx.model, target=ctx.target, num_classes=self.num_classes,
                                     device=ctx.device)
        warn_batch_level_parts(cfg, ctx.batch_size, "duda")
        self.extra_teachers: list[nn.Module] = []
        if cfg.teachers:
            self.extra_teachers, classes = load_teachers(cfg.teachers, device=ctx.device)
            check_same_classes(ctx.classes, "the source checkpoint", classes, cfg.teachers[0], what="method.teachers")
        self.total_iters = _schedule_iters(ctx, cfg)
        warm = cfg.small_warmup if cfg.small_warmup is not None else (0.0 if cfg.student_checkpoint else 0.25)
        self.warmup_steps = int(round(warm * self.total_iters))
        if self.warmup_steps:
            logger.info(f"duda: the small student distils from the frozen source model for {self.warmup_steps} "
                        f"steps first (method.small_warmup)")
        if not cfg.student_checkpoint and ctx.is_main:
            # Measured on both benchmarks: a short run cannot train a small network from scratch, so the delivered
            # model ends far below the source model and the collapse guard can only roll back to the random start.
            logger.warning("duda: no method.student_checkpoint: the small student starts from random weights and "
                           "learns only from the source model's predictions; train a small source model "
                           "(sfdaseg train-source --model SMALL ...) and pass it as method.student_checkpoint")

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {**super().frozen_modules(), **{f"teacher{i}": t for i, t in enumerate(self.extra_teachers)}}

    def state_dict(self):
        return {**super().state_dict(), "hist": self.hist.state_dict(), "confusion": self.confusion.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.hist.load_state_dict(state["hist"])
        self.confusion.load_state_dict(state["confusion"])

    def kd_weight(self, step: int) -> float:
        """The KL weight at ``step``: 0 when the main phase starts, ``kd_weight`` ``kd_ramp`` of it later."""
        main = step - self.warmup_steps
        return self.cfg.kd_weight * ramp(max(main, 0), self.total_iters - self.warmup_steps, self.cfg.kd_ramp)

    def warmup_step(self, batch: dict) -> StepOutput:
        """The small student distils from the frozen source model (the untouched teacher) on the strong view."""
        cfg = self.cfg
        x = to_model_input(batch["image"])
        size = tuple(x.shape[-2:])
        valid = valid_pixels(batch)
        with torch.no_grad():
            t_soft = torch.softmax(resize_logits(self.teacher(x), size).float() / cfg.temperature, dim=1)
            label = ignore_padding(t_soft.argmax(1), batch, self.ignore)
            maps = [t_soft] + ([valid.float()] if valid is not None else [])
            xs, _, *maps = self.view(x, label, *maps)
        small = self.wrapped.get("small", self.small)(xs)
        weight = None if valid is None else (maps[1] > 0.5).float()
        loss = kd_loss(small, maps[0], temperature=cfg.temperature, pixel_weight=weight)
        return StepOutput(loss, {"loss_warmup_kd": loss.detach()})

    def training_step(self, batch: dict, step: int) -> StepOutput:
        if step < self.warmup_steps:
            return self.warmup_step(batch)
        cfg = self.cfg
        x = to_model_input(batch["image"])  # (B, 3, H, W) weak view
        size = tuple(x.shape[-2:])
        valid = valid_pixels(batch)
        with torch.no_grad():
            logits = teacher_logits([self.teacher, *self.extra_teachers], x, size=size)
            probs = average_probs(logits)  # (B, C, H, W) at T = 1: the pseudo-labels
            conf, label = probs.max(1)
            label = ignore_padding(label, batch, self.ignore)
            t_soft = probs if cfg.temperature == 1.0 else average_probs(logits, temperature=cfg.temperature)
            del logits
            if cfg.policy == "class_balanced":  # percentiles of the running histogram, not of this batch
                self.hist.update(conf, label)
                label, weight = self.hist.select(conf, label, percentile=cfg.percentile, ignore_index=self.ignore)
            else:
                label, weight = select_pseudo_labels(cfg.policy, conf, label, num_classes=self.num_classes,
                                                     tau=cfg.tau, percentile=cfg.percentile,
                                                     ignore_index=self.ignore)
            stats = pseudo_label_stats(label, conf, num_classes=self.num_classes, ignore_index=self.ignore)
            maps = [m for m in (self.reg.source_probs(x), None if valid is None else valid.float()) if m is not None]
            x_mix, y_mix, w_mix, t_mix, *maps = self.view(x, label, weight, t_soft, *maps)
            src = maps.pop(0) if self.reg.source is not None else None
            valid_mix = maps.pop(0) > 0.5 if valid is not None else None
        large = self.net(x_mix)
        small = resize_logits(self.wrapped.get("small", self.small)(x_mix), size)  # upsampled once, used 3x
        loss_large = seg_cross_entropy(large, y_mix, ignore_index=self.ignore, pixel_weight=w_mix)
        loss_ce = seg_cross_entropy(small, y_mix, ignore_index=self.ignore, pixel_weight=w_mix)
        with torch.no_grad():
            small_label = small.detach().argmax(1)
            self.confusion.update(small_label, y_mix)  # running IoU over many batches and all ranks
            class_w = iou_class_weights(self.confusion.iou(), self.confusion.n_ref > 0)
            labelled = y_mix != self.ignore
            pixel_cw = class_w[torch.where(labelled, y_mix, 0)] * w_mix
            agreement = ((small_label == y_mix) & labelled).sum() / labelled.sum().clamp_min(1)
        loss_inc = seg_cross_entropy(small, y_mix, ignore_index=self.ignore, pixel_weight=pixel_cw)
        loss_kd = kd_loss(small, t_mix, temperature=cfg.temperature,
                          pixel_weight=None if valid_mix is None else valid_mix.float())
        kd_w = self.kd_weight(step)
        loss = cfg.large_weight * loss_large + loss_ce + cfg.inconsistency_weight * loss_inc + kd_w * loss_kd
        logs = {"loss_large": loss_large.detach(), "loss_small_ce": loss_ce.detach(),
                "loss_inconsistency": loss_inc.detach(), "loss_kd": loss_kd.detach(), "kd_weight": kd_w,
                "small_agreement": agreement.float()}
        if self.reg.active:
            reg_large, reg_logs = self.reg.loss(large, src, valid=valid_mix)
            reg_small, _ = self.reg.loss(small, src, valid=valid_mix)
            loss = loss + reg_large + reg_small
            logs.update(reg_logs)
        return StepOutput(loss, {**logs, **{f"pl/{k}": v for k, v in stats.items()}})

    def export_model(self) -> nn.Module:
        return self.teacher.module if self.cfg.deliver == "large_teacher" else self.small

    def extra_exports(self) -> dict[str, nn.Module]:
        """The model not delivered, saved beside ``model.ckpt`` as ``RUN/<name>.ckpt`` by ``adapt``."""
        if self.cfg.deliver == "large_teacher":
            return {"small_student": self.small}
        return {"large_teacher": self.teacher.module}


def build(ctx: AdaptContext, cfg: DUDAConfig) -> DUDA:
    return DUDA(ctx, cfg)
