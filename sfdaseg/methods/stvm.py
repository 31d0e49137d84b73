"""``stvm``: self-training via metric learning (STvM), source-free.

Published structure (STvM): the student learns from *every* teacher pixel with no confidence threshold; each
pixel's loss is scaled by a reliability read from a learned metric space; a metric network with the
classifier's architecture and one proxy per class are trained with a proxy-based metric loss on teacher
features labelled by the teacher; metric-guided online ClassMix (MOCM) chooses what to paste by reliability.

Reconstructed here (the exact forms are our design; all are ``method.*`` options):

- metric network ``M``: a 1x1 conv ``D -> embed_dim`` (the classifier's architecture) on the teacher's
  features, L2-normalised; proxies ``P`` ``(C, embed_dim)``, L2-normalised;
- metric loss: Proxy-Anchor (Kim et al. 2020; alpha 32, delta 0.1, as in its official code) on
  ``metric_pixels`` image pixels (never crop padding) sampled per step, labelled by the teacher's argmax;
  alternatives: ``proxy_nca`` (Movshovitz-Attias et al. 2017: ``-log(exp(-s d_y) / sum_{z != y} exp(-s d_z))``
  with ``d`` the squared distance of unit vectors) and ``proxy_softmax`` (``CE(s * cos)``, a normalised softmax;
  also what pytorch-metric-learning's ProxyNCALoss computes, whose denominator includes the positive proxy);
- the metric network and the proxies learn at ``optim.lr * optim.head_lr_mult * metric_lr_mult`` (a new head
  beside a fine-tuned model; Proxy-Anchor trains its proxies 100x faster than the embedding);
- reliability ``r = softmax_c(s * cos(M(f), P_c))`` at the teacher's class ``c``, with scale ``s`` =
  ``reliability_scale``, detached, computed at feature resolution and upsampled to the crop;
- MOCM: ClassMix whose classes are drawn with probability proportional to their mean reliability in the image;
  the reliability map travels with the mixed labels;
- student loss ``sum(r * CE) / sum(r)`` + ``metric_weight`` x metric loss (which trains only ``M`` and ``P``:
  the teacher's features are detached) + the collapse-prevention terms (:mod:`sfdaseg.regularizers`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sfdaseg.config_base import choices, param
from sfdaseg.data.transforms import to_model_input
from sfdaseg.losses import resize_logits, seg_cross_entropy
from sfdaseg.methods.common import (AdaptContext, RecipeConfig, TeacherStudentTask, ignore_padding, valid_pixels,
                                    warn_batch_level_parts)
from sfdaseg.models.ema import EMATeacher
from sfdaseg.pseudo_labels import pseudo_label_stats, softmax_confidence
from sfdaseg.regularizers import CollapseConfig, SourceRegularizer
from sfdaseg.strong_view import StrongView, StrongViewConfig
from sfdaseg.task import StepOutput


METRIC_LOSSES = ("proxy_anchor", "proxy_nca", "proxy_softmax")


@dataclass
class STvMConfig(CollapseConfig, StrongViewConfig, RecipeConfig):
    ema_momentum: float = param(0.999, ge=0.0, lt=1.0, origin="published", help="EMA teacher momentum")
    embed_dim: int = param(128, ge=1, origin="reconstructed", help="metric embedding dimension")
    metric_loss: str = choices(*METRIC_LOSSES, default="proxy_anchor", origin="reconstructed",
                               help="proxy-based metric loss of the metric network")
    alpha: float = param(32.0, gt=0.0, origin="published", help="Proxy-Anchor scale (Kim et al. 2020)")
    delta: float = param(0.1, ge=0.0, lt=1.0, origin="published", help="Proxy-Anchor margin")
    reliability_scale: float = param(16.0, gt=0.0, origin="reconstructed", help="s in softmax(s * cos)")
    metric_pixels: int = param(4096, ge=1, help="pixels sampled per step for the metric loss")
    metric_weight: float = param(1.0, ge=0.0, origin="reconstructed", help="weight of the metric loss")
    metric_lr_mult: float = param(10.0, gt=0.0,
                                  help="LR multiplier of the metric network and proxies on top of the head LR")
    reliability: bool = param(True, origin="published", help="weight every pixel by its reliability")
    mocm: bool = param(True, origin="published", help="metric-guided ClassMix (False: uniform ClassMix)")


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
    """Proxy-NCA (Movshovitz-Attias et al. 2017) on ``sim (N, C)`` cosine similarities of unit vectors.

    With ``d_c = ||e - p_c||^2 = 2 - 2 sim_c``: ``mean_i [s d_y + log sum_{z != y} exp(-s d_z)]``, the positive
    proxy left out of the denominator as in the paper.
    """
    d = 2.0 - 2.0 * sim.float()
    pos = F.one_hot(labels, sim.shape[1]).bool()
    neg = torch.logsumexp(torch.where(pos, torch.finfo(d.dtype).min, -scale * d), dim=1)
    return (scale * d.gather(1, labels[:, None])[:, 0] + neg).mean()


def proxy_softmax_loss(sim: torch.Tensor, labels: torch.Tensor, *, scale: float) -> torch.Tensor:
    """A normalised softmax over the proxies: ``CE(scale * sim, labels)`` (the positive in the denominator)."""
    return F.cross_entropy(scale * sim.float(), labels)


def reliability_at(sim: torch.Tensor, label: torch.Tensor, *, scale: float) -> torch.Tensor:
    """``softmax_c(scale * sim)`` read at ``label``: ``(B, C, h, w)``, ``(B, h, w)`` -> ``(B, 1, h, w)`` in [0, 1].

    Labels outside ``[0, C)`` (padding) read class 0; callers ignore those pixels.
    """
    return torch.softmax(scale * sim, dim=1).gather(1, label.clamp(0, sim.shape[1] - 1)[:, None])


def mocm_class_scores(label: torch.Tensor, reliability: torch.Tensor, *, num_classes: int) -> torch.Tensor:
    """MOCM's class scores ``(B, C)``: the mean reliability of each class's pixels in each image.

    ``label`` ``(B, h, w)`` (ignore allowed: not counted), ``reliability`` ``(B, 1, h, w)``. Absent classes score 0;
    ClassMix draws the classes it pastes with probability proportional to these scores.
    """
    c = num_classes
    bucket = torch.where((label >= 0) & (label < c), label, c)
    onehot = F.one_hot(bucket, c + 1)[..., :c].permute(0, 3, 1, 2).float()  # (B, C, h, w)
    return (onehot * reliability).sum((2, 3)) / onehot.sum((2, 3)).clamp_min(1.0)


METRIC_LOSS_FNS = {"proxy_anchor": proxy_anchor_loss, "proxy_nca": proxy_nca_loss, "proxy_softmax": proxy_softmax_loss}


class STvM(TeacherStudentTask):
    def __init__(self, ctx: AdaptContext, cfg: STvMConfig) -> None:
        model = ctx.model
        self.metric = MetricNet(model.feature_dim, cfg.embed_dim, ctx.classes.num_classes).to(ctx.device)
        self.metric.lr_mult = cfg.metric_lr_mult  # read by the trainer's build_param_groups
        self.metric.from_scratch = True  # optim.decay_to=init: no source value to return to
        super().__init__(model, EMATeacher(model, momentum=cfg.ema_momentum), export=ctx.export,
                         extra_trainable={"metric": self.metric})
        self.cfg = cfg
        self.num_classes = ctx.classes.num_classes
        self.ignore = ctx.classes.ignore_index
        self.view = StrongView(cfg, num_classes=self.num_classes, ignore_index=self.ignore)
        self.reg = SourceRegularizer(cfg, source=model, target=ctx.target, num_classes=self.num_classes,
                                     device=ctx.device)
        warn_batch_level_parts(cfg, ctx.batch_size, "stvm")

    def metric_loss(self, sim: torch.Tensor, label_lo: torch.Tensor) -> torch.Tensor:
        """The metric loss on ``metric_pixels`` pixels drawn among the labelled ones (``label_lo`` not ignore)."""
        cfg = self.cfg
        c = sim.shape[1]
        flat_sim = sim.permute(0, 2, 3, 1).reshape(-1, c)
        flat_label = label_lo.reshape(-1)
        labelled = ((flat_label >= 0) & (flat_label < c)).float()
        # Sampling weights instead of boolean indexing: no data-dependent shape, no host sync.
        idx = torch.multinomial(labelled + 1e-12, min(cfg.metric_pixels, flat_sim.shape[0]), replacement=True)
        kwargs = {"num_classes": c, "alpha": cfg.alpha, "delta": cfg.delta} if cfg.metric_loss == "proxy_anchor" \
            else {"scale": cfg.reliability_scale}
        return METRIC_LOSS_FNS[cfg.metric_loss](flat_sim[idx], flat_label[idx].clamp(0, c - 1), **kwargs)

    def training_step(self, batch: dict, step: int) -> StepOutput:
        cfg = self.cfg
        x = to_model_input(batch["image"])  # (B, 3, H, W) weak view
        size = tuple(x.shape[-2:])
        valid = valid_pixels(batch)
        metric = self.wrapped.get("metric", self.metric)
        with torch.no_grad():
            t_logits, t_feat = self.teacher(x, return_features=True)  # (B, C, h, w), (B, D, h, w)
            _, conf, label = softmax_confidence(resize_logits(t_logits, size))  # (B, H, W)
            label = ignore_padding(label, batch, self.ignore)
            label_lo = t_logits.argmax(1)  # (B, h, w): the teacher's class at feature resolution
            if valid is not None:  # padding at feature resolution is not a class either
                valid_lo = F.interpolate(valid[:, None].float(), size=label_lo.shape[-2:], mode="nearest")[:, 0]
                label_lo = torch.where(valid_lo > 0.5, label_lo, self.ignore)
        # Metric loss: trains M and the proxies on a random sample of teacher pixels (features detached).
        sim = metric(t_feat.detach())  # (B, C, h, w)
        metric_loss = self.metric_loss(sim, label_lo)
        with torch.no_grad():
            if cfg.reliability:
                rel_lo = reliability_at(sim.detach(), label_lo, scale=cfg.reliability_scale)  # (B, 1, h, w)
                rel = F.interpolate(rel_lo, size=size, mode="bilinear", align_corners=False)[:, 0]  # (B, H, W)
            else:
                rel_lo = torch.ones_like(label_lo[:, None], dtype=torch.float32)
                rel = torch.ones_like(conf)
            stats = pseudo_label_stats(label, conf, num_classes=self.num_classes, ignore_index=self.ignore)
            # MOCM: reliable classes get pasted more often (uniform ClassMix without it).
            scores = mocm_class_scores(label_lo, rel_lo, num_classes=self.num_classes) \
                if cfg.classmix and cfg.mocm else None
            maps = [m for m in (self.reg.source_probs(x), None if valid is None else valid.float()) if m is not None]
            xs, label, rel, *maps = self.view(x, label, rel, *maps, class_scores=scores)
            src = maps.pop(0) if self.reg.source is not None else None
            valid = maps.pop(0) > 0.5 if valid is not None else None
        logits = self.net(xs)
        # sum(r * CE) / sum(r): the reliabilities weigh pixels against each other (METHODS.md), they do not scale
        # the loss.
        loss_st = seg_cross_entropy(logits, label, ignore_index=self.ignore, pixel_weight=rel, normalize="weight")
        loss_reg, reg_logs = self.reg.loss(logits, src, valid=valid) if self.reg.active else (0.0, {})
        loss = loss_st + cfg.metric_weight * metric_loss + loss_reg
        logs = {"loss_st": loss_st.detach(), "loss_metric": metric_loss.detach(), "reliability": rel.mean(),
                **reg_logs, **{f"pl/{k}": v for k, v in stats.items()}}
        return StepOutput(loss, logs)


def build(ctx: AdaptContext, cfg: STvMConfig) -> STvM:
    return STvM(ctx, cfg)
