"""``diga_sf``: DiGA made source-free.

Published DiGA (Shen et al., CVPR 2023; code fy-vision/DiGA) is an unsupervised DA method: it warms up with
source images and pastes source objects into target images. Our source-free variant (the whole adaptation
stage below is ours, built from DiGA's target-side parts) drops everything that needs source data and starts
from the source model:

- **offline pseudo-labels**: the frozen source model labels every target image once, fusing scales 1.0 and 0.5
  by the max of the upsampled probabilities, with no threshold (cached on disk, reused across runs);
- **threshold-free bilateral consensus**: an offline label is kept only where it equals the nearest-class-
  centroid label of the EMA teacher's features; elsewhere the pixel is ignored. Centroids are running means of
  target features per class (momentum 1e-4, as published), initialised by a pass over ``proto_init_images``
  target images with the source model's features and the offline labels (our choice: with momentum 1e-4 an
  initialisation from a single batch would hardly move);
- **cross-view ("symmetric") distillation**: the teacher's soft prediction on the weak view supervises the
  student on the strong, mixed view (mixed with the same ClassMix mask), plus ``reverse_weight`` = 0.5 x the
  reverse direction (the teacher on the strong view supervises the student on the weak view; this costs one
  more student and teacher forward, set 0 to skip it); soft cross-entropy, weight 0.25 beside the CE;
- **target-to-target ClassMix** replaces DiGA's source-to-target pasting.

Loss = CE(student(x_mix), consensus labels mixed) + 0.25 * (softCE(T(x) -> S(x_mix)) + 0.5 softCE(T(x_s) -> S(x))).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sfdaseg.config_base import ConfigError
from sfdaseg.data.transforms import collate, to_model_input
from sfdaseg.losses import resize_logits, seg_cross_entropy, soft_cross_entropy
from sfdaseg.methods.common import AdaptContext, OfflineLabelRequest, RecipeConfig, TeacherStudentTask
from sfdaseg.models.ema import EMATeacher
from sfdaseg.pseudo_labels import PrototypeMemory, bilateral_consensus, pseudo_label_stats
from sfdaseg.strong_view import StrongView, StrongViewConfig
from sfdaseg.task import StepOutput


@dataclass
class DiGAConfig(StrongViewConfig, RecipeConfig):
    ema_momentum: float = 0.999
    offline_scales: tuple[float, ...] = (1.0, 0.5)  # multi-scale max fusion of the offline labeller
    proto_momentum: float = 1e-4
    proto_init_images: int = 200
    consensus: bool = True  # False: train on the raw offline labels (ablation)
    distill_weight: float = 0.25
    reverse_weight: float = 0.5
    temperature: float = 1.0

    def validate(self) -> None:
        super().validate()
        if not self.offline_scales or min(self.offline_scales) <= 0:
            raise ConfigError(f"method.offline_scales: expected positive scales, got {list(self.offline_scales)}")

    def offline_labels(self) -> OfflineLabelRequest:
        return OfflineLabelRequest(scales=tuple(self.offline_scales))


class DiGASourceFree(TeacherStudentTask):
    def __init__(self, ctx: AdaptContext, cfg: DiGAConfig) -> None:
        model = ctx.model
        super().__init__(model, EMATeacher(model, momentum=cfg.ema_momentum), export=ctx.export)
        self.cfg = cfg
        self.num_classes = ctx.classes.num_classes
        self.ignore = ctx.classes.ignore_index
        self.view = StrongView(cfg, num_classes=self.num_classes, ignore_index=self.ignore)
        self.protos = PrototypeMemory(self.num_classes, model.feature_dim, momentum=cfg.proto_momentum).to(ctx.device)
        if ctx.target is not None and cfg.proto_init_images > 0:
            self._init_prototypes(ctx)

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

    def training_step(self, batch: dict, step: int) -> StepOutput:
        cfg = self.cfg
        x = to_model_input(batch["image"])  # (B, 3, H, W) weak view
        size = tuple(x.shape[-2:])
        offline = batch["pl_label"].long()  # (B, H, W): source model, multi-scale max fusion
        with torch.no_grad():
            t_logits, t_feat = self.teacher(x, return_features=True)
            off_lo = F.interpolate(offline[:, None].float(), size=t_feat.shape[-2:], mode="nearest")[:, 0].long()
            self.protos.update(t_feat, off_lo)
            if cfg.consensus:
                proto = self.protos.nearest(t_feat)  # (B, h, w)
                proto = F.interpolate(proto[:, None].float(), size=size, mode="nearest")[:, 0].long()
                label = bilateral_consensus(offline, proto, ignore_index=self.ignore)
            else:
                label = offline
            conf = batch["pl_conf"].float() / 255.0
            stats = pseudo_label_stats(label, conf, num_classes=self.num_classes, ignore_index=self.ignore)
            t_probs = torch.softmax(resize_logits(t_logits, size).float() / cfg.temperature, dim=1)
            xs = self.view.perturb(x)
            x_mix, y_mix, t_mix = self.view.mix(label, xs, t_probs)
        reverse = cfg.reverse_weight > 0
        # One student forward over both views (DDP expects one forward per backward; one big batch is faster).
        s_all = self.net(torch.cat([x_mix, x]) if reverse else x_mix)
        s_mix = s_all[: x.shape[0]]
        loss_ce = seg_cross_entropy(s_mix, y_mix, ignore_index=self.ignore)
        loss_kd = soft_cross_entropy(s_mix, t_mix, temperature=cfg.temperature)
        logs = {"loss_ce": loss_ce.detach(), "loss_kd": loss_kd.detach()}
        if reverse:
            with torch.no_grad():
                t_strong = torch.softmax(resize_logits(self.teacher(xs), size).float() / cfg.temperature, dim=1)
            loss_rev = soft_cross_entropy(s_all[x.shape[0]:], t_strong, temperature=cfg.temperature)
            loss_kd = loss_kd + cfg.reverse_weight * loss_rev
            logs["loss_kd_rev"] = loss_rev.detach()
        loss = loss_ce + cfg.distill_weight * loss_kd
        return StepOutput(loss, {**logs, **{f"pl/{k}": v for k, v in stats.items()}})


def build(ctx: AdaptContext, cfg: DiGAConfig) -> DiGASourceFree:
    return DiGASourceFree(ctx, cfg)
