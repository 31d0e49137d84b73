"""``stvm``: self-training via metric learning (STvM), source-free.

Published structure (STvM): the student learns from *every* teacher pixel with no confidence threshold; each
pixel's loss is scaled by a reliability read from a learned metric space; a metric network with the
classifier's architecture and one proxy per class are trained with a proxy-based metric loss on teacher
features labelled by the teacher; metric-guided online ClassMix (MOCM) chooses what to paste by reliability.

Reconstructed here (the exact forms are our design; all are ``method.*`` options):

- metric network ``M``: a 1x1 conv ``D -> embed_dim`` (the classifier's architecture) on the teacher's
  features, L2-normalised; proxies ``P`` ``(C, embed_dim)``, L2-normalised;
- metric loss: Proxy-Anchor (Kim et al. 2020; alpha 32, delta 0.1) on ``metric_pixels`` pixels sampled per
  step, labelled by the teacher's argmax (``proxy_nca`` is the alternative);
- reliability ``r = softmax_c(s * cos(M(f), P_c))`` at the teacher's class ``c``, with scale ``s`` =
  ``reliability_scale``, detached, computed at feature resolution and upsampled to the crop;
- MOCM: ClassMix whose classes are drawn with probability proportional to their mean reliability in the image;
  the reliability map travels with the mixed labels;
- student loss ``sum(r * CE) / sum(r)`` + ``metric_weight`` x metric loss (which trains only ``M`` and ``P``:
  the teacher's features are detached).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sfdaseg.config_base import choices
from sfdaseg.data.transforms import to_model_input
from sfdaseg.losses import resize_logits, seg_cross_entropy
from sfdaseg.methods.common import AdaptContext, RecipeConfig, TeacherStudentTask
from sfdaseg.models.ema import EMATeacher
from sfdaseg.pseudo_labels import pseudo_label_stats, softmax_confidence
from sfdaseg.strong_view import StrongView, StrongViewConfig
from sfdaseg.task import StepOutput


@dataclass
class STvMConfig(StrongViewConfig, RecipeConfig):
    ema_momentum: float = 0.999
    embed_dim: int = 128
    metric_loss: str = choices("proxy_anchor", "proxy_nca", default="proxy_anchor")
    alpha: float = 32.0  # Proxy-Anchor scale
    delta: float = 0.1  # Proxy-Anchor margin
    reliability_scale: float = 16.0  # s in softmax(s * cos)
    metric_pixels: int = 4096  # pixels sampled per step for the metric loss
    metric_weight: float = 1.0
    reliability: bool = True  # False: plain CE on every teacher pixel (ablation)
    mocm: bool = True  # False: uniform ClassMix (ablation)


class MetricNet(nn.Module):
    """Embedding head ``M`` plus class proxies.

    ``embed(f)``: features ``(B, D, h, w)`` -> unit embeddings ``(B, E, h, w)``; ``similarity(e)``: cosine
    similarity to every proxy ``(B, C, h, w)``.
    """

    def __init__(self, feature_dim: int, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(feature_dim, embed_dim, 1)
        self.proxies = nn.Parameter(torch.randn(num_classes, embed_dim) * 0.1)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(features.float()), dim=1)

    def similarity(self, emb: torch.Tensor) -> torch.Tensor:
        return torch.einsum("behw,ce->bchw", emb, F.normalize(self.proxies, dim=1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # float32 throughout: cosine similarities feed exp(alpha * s) with alpha = 32.
        with torch.autocast(features.device.type, enabled=False):
            return self.similarity(self.embed(features))

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"head": list(self.parameters())}  # a new head: it learns at the head learning rate


def proxy_anchor_loss(sim: torch.Tensor, labels: torch.Tensor, *, num_classes: int, alpha: float,
                      delta: float) -> torch.Tensor:
    """Proxy-Anchor loss (Kim et al. 2020) on ``sim (N, C)`` cosine similarities and ``labels (N,)``.

    Pulls each proxy towards its positives and pushes it from the rest; proxies without positives in the batch
    contribute only to the negative term. Computed with log-sum-exp (``alpha`` up to 32 would overflow ``exp``).
    """
    pos = F.one_hot(labels, num_classes).bool()  # (N, C)
    neg_inf = torch.finfo(sim.dtype).min
    pos_lse = torch.logsumexp(torch.where(pos, -alpha * (sim - delta), neg_inf), dim=0)  # (C,)
    neg_lse = torch.logsumexp(torch.where(~pos, alpha * (sim + delta), neg_inf), dim=0)
    has_pos = pos.any(0)
    pos_term = (F.softplus(pos_lse) * has_pos).sum() / has_pos.sum().clamp_min(1)
    return pos_term + F.softplus(neg_lse).mean()


def proxy_nca_loss(sim: torch.Tensor, labels: torch.Tensor, *, scale: float) -> torch.Tensor:
    """Proxy-NCA as a softmax over scaled cosine similarities: ``CE(scale * sim, labels)``."""
    return F.cross_entropy(scale * sim, labels)


class STvM(TeacherStudentTask):
    def __init__(self, ctx: AdaptContext, cfg: STvMConfig) -> None:
        model = ctx.model
        self.metric = MetricNet(model.feature_dim, cfg.embed_dim, ctx.classes.num_classes).to(ctx.device)
        super().__init__(model, EMATeacher(model, momentum=cfg.ema_momentum), export=ctx.export,
                         extra_trainable={"metric": self.metric})
        self.cfg = cfg
        self.num_classes = ctx.classes.num_classes
        self.ignore = ctx.classes.ignore_index
        self.view = StrongView(cfg, num_classes=self.num_classes, ignore_index=self.ignore)

    def training_step(self, batch: dict, step: int) -> StepOutput:
        cfg = self.cfg
        x = to_model_input(batch["image"])  # (B, 3, H, W) weak view
        size = tuple(x.shape[-2:])
        metric = self.wrapped.get("metric", self.metric)
        with torch.no_grad():
            t_logits, t_feat = self.teacher(x, return_features=True)  # (B, C, h, w), (B, D, h, w)
            _, conf, label = softmax_confidence(resize_logits(t_logits, size))  # (B, H, W)
            label_lo = t_logits.argmax(1)  # (B, h, w): the teacher's class at feature resolution
        # Metric loss: trains M and the proxies on a random sample of teacher pixels (features detached).
        sim = metric(t_feat.detach())  # (B, C, h, w)
        b, c, h, w = sim.shape
        flat_sim = sim.permute(0, 2, 3, 1).reshape(-1, c)
        idx = torch.randint(flat_sim.shape[0], (min(cfg.metric_pixels, flat_sim.shape[0]),), device=sim.device)
        if cfg.metric_loss == "proxy_anchor":
            metric_loss = proxy_anchor_loss(flat_sim[idx], label_lo.flatten()[idx], num_classes=c,
                                            alpha=cfg.alpha, delta=cfg.delta)
        else:
            metric_loss = proxy_nca_loss(flat_sim[idx], label_lo.flatten()[idx], scale=cfg.reliability_scale)
        with torch.no_grad():
            if cfg.reliability:
                rel_lo = torch.softmax(cfg.reliability_scale * sim.detach(), dim=1).gather(1, label_lo[:, None])
                rel = F.interpolate(rel_lo, size=size, mode="bilinear", align_corners=False)[:, 0]  # (B, H, W)
            else:
                rel = torch.ones_like(conf)
            stats = pseudo_label_stats(label, conf, num_classes=self.num_classes, ignore_index=self.ignore)
            scores = None
            if cfg.classmix and cfg.mocm:
                # Mean reliability of each class in each image (B, C): reliable classes get pasted more often.
                onehot = F.one_hot(label_lo, c).permute(0, 3, 1, 2).float()  # (B, C, h, w)
                r = rel_lo if cfg.reliability else torch.ones_like(onehot[:, :1])
                scores = (onehot * r).sum((2, 3)) / onehot.sum((2, 3)).clamp_min(1.0)
            xs, label, rel = self.view(x, label, rel, class_scores=scores)
        loss_st = seg_cross_entropy(self.net(xs), label, ignore_index=self.ignore, pixel_weight=rel)
        loss = loss_st + cfg.metric_weight * metric_loss
        logs = {"loss_st": loss_st.detach(), "loss_metric": metric_loss.detach(), "reliability": rel.mean(),
                **{f"pl/{k}": v for k, v in stats.items()}}
        return StepOutput(loss, logs)


def build(ctx: AdaptContext, cfg: STvMConfig) -> STvM:
    return STvM(ctx, cfg)
