"""``diga_sf``: DiGA made source-free.

Published DiGA (Shen et al., CVPR 2023; code fy-vision/DiGA) is an unsupervised DA method: it warms up with
source images, pastes source objects into target images and distils on source images. Our source-free variant
drops everything that needs source data and starts from the source model. Its target-side parts follow the
official code, each with a ``method.*`` switch to the alternative:

- **offline pseudo-labels** (official): the frozen source model labels every target image once at scales 1.0 and
  0.5, fused by the maximum of the upsampled *logits*, then one softmax (``offline_fusion=logits``; ``probs``:
  the maximum of each scale's probabilities); no threshold; cached on disk, reused across runs;
- **threshold-free bilateral consensus** (official): an offline label is kept only where it equals the
  nearest-class-centroid label of the EMA teacher's features; elsewhere the pixel is ignored. The distance is
  Euclidean on the raw features (``proto_metric=euclidean``, official; ``cosine``: on unit vectors);
- **centroid updates** (official): after each step's consensus, every centroid moves by ``proto_momentum``
  (1e-4) towards the mean feature of its class *per image*, from the consensus labels intersected with the
  teacher's argmax, for classes with at least ``proto_min_pixels`` (5) pixels in the image
  (``proto_update=consensus``; ``offline``: one batch-mean step from the raw offline labels). The centroids
  start as the class means of the source model's features over the first ``proto_init_images`` target images
  labelled by the offline labels (DiGA initialises them on the target set with its warm-up model's argmax;
  source-free, the source model is that model);
- **cross-view ("symmetric") distillation**: the teacher's soft prediction on the weak view supervises the
  student on the strong, mixed view, plus ``reverse_weight`` = 0.5 x the reverse direction (the teacher on the
  strong view supervises the student on the weak view; one more student and teacher forward, 0 skips it); soft
  cross-entropy at temperature 1, weight ``distill_weight`` = 0.25 beside the CE (DiGA's self-training values).
  **Ours**: DiGA distils on *source* images (original vs. style-translated view, same geometry); source-free we
  distil on target images, so the teacher's probabilities are mixed with the same ClassMix mask as the labels;
- **target-to-target ClassMix** (ours) replaces DiGA's source-to-target pasting;
- deviations kept: the EMA teacher labels in eval mode (DiGA's teacher keeps dropout on), and the CE is the mean
  over the labelled pixels (DiGA's divides by every pixel, ignored ones included).

Loss = CE(student(x_mix), consensus labels mixed) + 0.25 * (softCE(T(x) -> S(x_mix)) + 0.5 softCE(T(x_s) -> S(x)))
+ the collapse-prevention terms (:mod:`sfdaseg.regularizers`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sfdaseg.data.transforms import collate, to_model_input
from sfdaseg.losses import resize_logits, seg_cross_entropy, soft_cross_entropy
from sfdaseg.config_base import choices, param
from sfdaseg.methods.common import (AdaptContext, OfflineLabelRequest, RecipeConfig, TeacherStudentTask, valid_pixels,
                                    warn_batch_level_parts)
from sfdaseg.models.ema import EMATeacher
from sfdaseg.offline_labels import FUSIONS
from sfdaseg.pseudo_labels import METRICS, PrototypeMemory, bilateral_consensus, pseudo_label_stats
from sfdaseg.regularizers import CollapseConfig, SourceRegularizer
from sfdaseg.strong_view import StrongView, StrongViewConfig
from sfdaseg.task import StepOutput


@dataclass
class DiGAConfig(CollapseConfig, StrongViewConfig, RecipeConfig):
    ema_momentum: float = param(0.999, ge=0.0, lt=1.0, origin="published", help="EMA teacher momentum")
    offline_scales: tuple[float, ...] = param((1.0, 0.5), gt=0.0, nonempty=True, origin="published",
                                              help="scales of the offline labeller (max fusion)")
    offline_fusion: str = choices(*reversed(FUSIONS), default="logits", origin="published",
                                  help="fuse the scales by the max of the logits (DiGA) or of the probabilities")
    proto_metric: str = choices(*reversed(METRICS), default="euclidean", origin="published",
                                help="nearest centroid by Euclidean distance on raw features (DiGA) or cosine")
    proto_update: str = choices("consensus", "offline", default="consensus", origin="published",
                                help="centroids move per image from consensus labels intersected with the teacher's "
                                     "argmax (DiGA), or per batch from the raw offline labels")
    proto_momentum: float = param(1e-4, ge=0.0, le=1.0, origin="published", help="centroid momentum")
    proto_min_pixels: int = param(5, ge=1, origin="published",
                                  help="proto_update=consensus: pixels of a class an image needs to update it")
    proto_init_images: int = param(200, ge=0, help="target images the centroids are initialised on")
    consensus: bool = param(True, origin="published", help="bilateral consensus (False: raw offline labels)")
    distill_weight: float = param(0.25, ge=0.0, origin="published", help="weight of the cross-view distillation")
    reverse_weight: float = param(0.5, ge=0.0, origin="published",
                                  help="weight of the reverse direction (strong view teaches weak)")
    temperature: float = param(1.0, gt=0.0, origin="published", help="distillation temperature")

    def offline_labels(self) -> OfflineLabelRequest:
        return OfflineLabelRequest(scales=tuple(self.offline_scales), options={"fusion": self.offline_fusion})


class DiGASourceFree(TeacherStudentTask):
    def __init__(self, ctx: AdaptContext, cfg: DiGAConfig) -> None:
        model = ctx.model
        super().__init__(model, EMATeacher(model, momentum=cfg.ema_momentum), export=ctx.export)
        self.cfg = cfg
        self.num_classes = ctx.classes.num_classes
        self.ignore = ctx.classes.ignore_index
        self.view = StrongView(cfg, num_classes=self.num_classes, ignore_index=self.ignore)
        self.protos = PrototypeMemory(self.num_classes, model.feature_dim, momentum=cfg.proto_momentum,
                                      metric=cfg.proto_metric).to(ctx.device)
        if ctx.target is not None and cfg.proto_init_images > 0:
            self._init_prototypes(ctx)
        self.reg = SourceRegularizer(cfg, source=model, target=ctx.target, num_classes=self.num_classes,
                                     device=ctx.device)
        warn_batch_level_parts(cfg, ctx.batch_size, "diga_sf")

    @torch.no_grad()
    def _init_prototypes(self, ctx: AdaptContext) -> None:
        """Class means of source-model features over the first ``proto_init_images`` target images."""
        model = self.teacher.module
        n = min(self.cfg.proto_init_images, len(ctx.target))
        dim = model.feature_dim
        sums = torch.zeros(self.num_classes, dim, device=ctx.device)
        counts = torch.zeros(self.num_classes, device=ctx.device)
        for start in range(0, n, 8):
            batch = collate([ctx.target[i] for i in range(start, min(n, start + 8))])
            images = batch["image"]
            if isinstance(images, list):  # images of different sizes: one at a time
                pairs = [(im[None], lb[None]) for im, lb in zip(images, batch["pl_label"])]
            else:
                pairs = [(images, batch["pl_label"])]
            for im, lb in pairs:
                _, feat = model(to_model_input(im.to(ctx.device)), return_features=True)
                lab = F.interpolate(lb[:, None].float().to(ctx.device), size=feat.shape[-2:], mode="nearest")
                lab = lab[:, 0].long()
                valid = lab != self.ignore
                onehot = F.one_hot(torch.where(valid, lab, 0), self.num_classes).float() * valid[..., None]
                sums += torch.einsum("bhwc,bdhw->cd", onehot, feat.float())
                counts += onehot.sum((0, 1, 2))
        self.protos.centroids.copy_(sums / counts.clamp_min(1)[:, None])
        self.protos.initialized.copy_(counts > 0)

    def state_dict(self):
        return {"teacher": self.teacher.state_dict(), "protos": self.protos.state_dict()}

    def load_state_dict(self, state):
        self.teacher.load_state_dict(state["teacher"])
        self.protos.load_state_dict(state["protos"])

    @torch.no_grad()
    def pseudo_labels(self, t_logits: torch.Tensor, t_feat: torch.Tensor, offline: torch.Tensor) -> torch.Tensor:
        """The labels trained on ``(B, H, W)``, and the centroid update of this step.

        ``t_logits`` / ``t_feat`` ``(B, C|D, h, w)`` are the EMA teacher's on the weak view; ``offline``
        ``(B, H, W)`` the cached multi-scale labels (255 on crop padding).
        """
        cfg = self.cfg
        size = tuple(offline.shape[-2:])
        if cfg.proto_update == "offline":  # the batch mean of the raw offline labels, before the consensus
            self.protos.update(t_feat, offline)
        if cfg.consensus:
            proto = self.protos.nearest(t_feat)  # (B, h, w)
            proto = F.interpolate(proto[:, None].float(), size=size, mode="nearest")[:, 0].long()
            label = bilateral_consensus(offline, proto, ignore_index=self.ignore)
        else:
            label = offline
        if cfg.proto_update == "consensus":  # DiGA: per image, consensus labels where the teacher agrees
            argmax = resize_logits(t_logits, size).argmax(1)
            agreed = torch.where(label == argmax, label, self.ignore)
            self.protos.update_per_image(t_feat, agreed, min_pixels=cfg.proto_min_pixels)
        return label

    def training_step(self, batch: dict, step: int) -> StepOutput:
        cfg = self.cfg
        x = to_model_input(batch["image"])  # (B, 3, H, W) weak view
        size = tuple(x.shape[-2:])
        valid = valid_pixels(batch)
        offline = batch["pl_label"].long()  # (B, H, W): source model, multi-scale max fusion, 255 on padding
        with torch.no_grad():
            t_logits, t_feat = self.teacher(x, return_features=True)
            label = self.pseudo_labels(t_logits, t_feat, offline)
            conf = batch["pl_conf"].float() / 255.0
            stats = pseudo_label_stats(label, conf, num_classes=self.num_classes, ignore_index=self.ignore)
            t_probs = torch.softmax(resize_logits(t_logits, size).float() / cfg.temperature, dim=1)
            xs = self.view.perturb(x)
            maps = [m for m in (self.reg.source_probs(x), None if valid is None else valid.float()) if m is not None]
            x_mix, y_mix, t_mix, *maps = self.view.mix(label, xs, t_probs, *maps)
            src = maps.pop(0) if self.reg.source is not None else None
            valid_mix = maps.pop(0) > 0.5 if valid is not None else None
        reverse = cfg.reverse_weight > 0
        # One student forward over both views (DDP expects one forward per backward; one big batch is faster).
        s_all = self.net(torch.cat([x_mix, x]) if reverse else x_mix)
        s_mix = s_all[: x.shape[0]]
        loss_ce = seg_cross_entropy(s_mix, y_mix, ignore_index=self.ignore)
        # Soft targets only on image pixels: the teacher's output on crop padding teaches nothing.
        loss_kd = soft_cross_entropy(s_mix, t_mix, temperature=cfg.temperature, pixel_weight=_weight(valid_mix))
        logs = {"loss_ce": loss_ce.detach(), "loss_kd": loss_kd.detach()}
        if reverse:
            with torch.no_grad():
                t_strong = torch.softmax(resize_logits(self.teacher(xs), size).float() / cfg.temperature, dim=1)
            loss_rev = soft_cross_entropy(s_all[x.shape[0]:], t_strong, temperature=cfg.temperature,
                                          pixel_weight=_weight(valid))
            loss_kd = loss_kd + cfg.reverse_weight * loss_rev
            logs["loss_kd_rev"] = loss_rev.detach()
        loss = loss_ce + cfg.distill_weight * loss_kd
        if self.reg.active:
            loss_reg, reg_logs = self.reg.loss(s_mix, src, valid=valid_mix)
            loss = loss + loss_reg
            logs.update(reg_logs)
        return StepOutput(loss, {**logs, **{f"pl/{k}": v for k, v in stats.items()}})


def _weight(valid: torch.Tensor | None) -> torch.Tensor | None:
    return None if valid is None else valid.float()


def build(ctx: AdaptContext, cfg: DiGAConfig) -> DiGASourceFree:
    return DiGASourceFree(ctx, cfg)
