"""``unisfda``: UniSFDA's self-training with uncertainty-aware online + offline pseudo-label fusion.

UniSFDA (multi-stage, model-agnostic) adapts several *auxiliary* source models of any architecture (stage 1),
fuses them into ensemble pseudo-labels (cross-model transfer) and trains one efficient image-only model on
those (stage 2); :mod:`sfdaseg.runs.pipeline` runs the stages. This module is the recipe each stage runs (one
model; ``sfdaseg adapt --recipe unisfda``) and the ensemble's fusion.

Per step, on a batch of unlabelled target crops ``x`` (the weak view):

1. **offline label**: ``y_off`` and its certainty ``c_off`` come from the cache (``pl_label`` / ``pl_conf``).
   Stage 1: the frozen source model labelled every target image once, with ``mc_passes`` MC-dropout passes of
   its classifier on features computed once (:func:`sfdaseg.uncertainty.mc_dropout`); the cache's confidence
   channel holds the certainty ``1 - H(mean p) / log C`` (``uncertainty_measure="entropy"``) or ``1 - 2 std``
   of the predicted class's probability across passes (``"variance"``), and the cache is keyed by the model's
   fingerprint plus these settings. Stage 2 (``offline_cache``): a finished cache the ensemble wrote.
2. **online label**: the EMA teacher extracts features once and its classifier is sampled ``online_mc_passes``
   times: ``y_on = argmax`` of the mean probability, ``c_on`` its certainty by the same measure.
3. **fusion** (METHODS.md's rule): where the offline label is *certain* it is kept; where it is *uncertain* the
   online label is taken if that one is certain, else the pixel is ignored. "Uncertain" is per class: the
   offline label of class ``k`` is uncertain when its uncertainty is above the ``offline_percentile``-th
   percentile of the uncertainties of the class-``k`` offline pixels of the batch (so the
   ``100 - offline_percentile`` % least certain pixels of every class are handed over, rare classes included);
   the online label is certain when its certainty is within the top ``online_percentile`` % of its class's
   online pixels of the batch. Both use :func:`sfdaseg.pseudo_labels.select_class_balanced` (ties kept).
4. **pixel weights** (``pixel_weight="certainty"``): each kept pixel counts with the certainty of the label it
   got (``c_off`` or ``c_on``), and the loss is the mean of ``certainty * CE`` over the labelled pixels, so a batch
   of uncertain labels teaches less; ``"none"``: 1.
5. **student view**: intra-domain style augmentation (:mod:`sfdaseg.style`: each image re-styled with the
   low-frequency Fourier amplitude, or the AdaIN statistics, of another target image of the batch), then
   photometric augmentation; optional target ClassMix (off by default: not part of UniSFDA).
6. loss = certainty-weighted CE of the student on that view; the teacher follows the student by EMA. Stage 2
   may add ``kd_weight`` x KL to the auxiliary models' uncertainty-weighted soft ensemble computed online
   (``kd_teachers``; :func:`sfdaseg.distill.kd_loss`); by default (``kd_weight`` 0) stage 2 learns from the
   ensemble's **hard** labels only, since the cache keeps a label and a certainty per pixel, not the ``C``
   probabilities.

**Cross-model transfer** (:class:`EnsembleLabeller`, :func:`uncertainty_weighted_fusion`): each adapted
auxiliary model gives MC-dropout mean probabilities ``p_m`` and a certainty ``c_m`` per pixel; the weights are
``w_m = c_m / sum_k c_k`` (softmax-free) and the fused prediction ``p = sum_m w_m p_m``; its label is
``argmax p`` and its certainty ``1 - H(p) / log C`` (low where the models disagree).

Published (UniSFDA abstract and figures): the stages, MC-dropout uncertainty deciding between offline and
online pseudo-labels, intra-domain style augmentation, an ensemble of auxiliary models of different
architectures distilled into one efficient model. **Reconstructed** (our design, configurable, no paper
numbers claimed for it): the certainty measures and their uint8 storage, the per-class batch percentiles
(``offline_percentile`` = ``online_percentile`` = 80: one rule for both labels; at the start the EMA teacher is
the source model, so the pixels it rescues are few and grow as it adapts), the certainty pixel weights, the
order style -> photometric, the certainty-weighted ensemble fusion and its certainty, hard ensemble labels with
the online fallback in stage 2, the optional online-ensemble KL, and every default value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

from sfdaseg.class_stats import RunningClassHistogram
from sfdaseg.config_base import ConfigError, choices, param
from sfdaseg.data.transforms import to_model_input
from sfdaseg.distill import check_same_classes, kd_loss, load_teachers
from sfdaseg.losses import resize_logits, seg_cross_entropy
from sfdaseg.methods.common import (AdaptContext, OfflineLabelRequest, RecipeConfig, TeacherStudentTask, ignore_padding,
                                    valid_pixels, warn_batch_level_parts)
from sfdaseg.models.ema import EMATeacher
from sfdaseg.offline_labels import MEASURES, entropy_certainty, mc_certainty
from sfdaseg.pseudo_labels import IGNORE_INDEX, pseudo_label_stats, select_class_balanced
from sfdaseg.regularizers import CollapseConfig, SourceRegularizer
from sfdaseg.strong_view import StrongView, StrongViewConfig
from sfdaseg.task import StepOutput
from sfdaseg.uncertainty import mc_dropout, mc_dropout_features

__all__ = [
    "EnsembleLabeller",
    "FusedLabels",
    "UniSFDA",
    "UniSFDAConfig",
    "build",
    "fuse_online_offline",
    "percentile_certain",
    "uncertainty_weighted_fusion",
]


# --------------------------------------------------------------------------------------------------------------
# Online + offline fusion
# --------------------------------------------------------------------------------------------------------------


def percentile_certain(certainty: Tensor, label: Tensor, *, num_classes: int, percentile: float,
                       ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``(B, H, W)`` bool: the pixels whose certainty is in the top ``percentile`` % of their class in the batch.

    Equivalently: not certain = uncertainty above the class's ``percentile``-th percentile. Ignored pixels are
    never certain. ``percentile`` 100 makes every labelled pixel certain, 0 none.
    """
    _, weight = select_class_balanced(certainty, label, num_classes=num_classes, percentile=percentile,
                                      ignore_index=ignore_index)
    return weight > 0


class FusedLabels(NamedTuple):
    """Result of :func:`fuse_online_offline`, all ``(B, H, W)``."""

    label: Tensor  # long, ignore_index where neither label is trusted
    certainty: Tensor  # float32: the certainty of the label taken (0 where ignored)
    from_offline: Tensor  # bool: the offline label was kept
    from_online: Tensor  # bool: the online label replaced an uncertain offline one


def fuse_online_offline(offline_label: Tensor, offline_certainty: Tensor, online_label: Tensor,
                        online_certainty: Tensor, *, num_classes: int, offline_percentile: float,
                        online_percentile: float, ignore_index: int = IGNORE_INDEX,
                        offline_stats: RunningClassHistogram | None = None,
                        online_stats: RunningClassHistogram | None = None) -> FusedLabels:
    """UniSFDA's uncertainty-aware fusion of offline and online pseudo-labels (see the module docstring).

    Args:
        offline_label: ``(B, H, W)`` integer, ``ignore_index`` where there is none (e.g. crop padding: stays
            ignored).
        offline_certainty: ``(B, H, W)`` float in ``[0, 1]``.
        online_label, online_certainty: the same for the EMA teacher.
        offline_percentile: an offline label is certain when its certainty is in the top ``offline_percentile``
            % of its class (its uncertainty at most the class's ``offline_percentile``-th percentile).
        online_percentile: the same for the online label, among the online pixels of its class.
        offline_stats, online_stats: running per-class certainty histograms (over many batches and all ranks);
            when given, this batch is folded into them and the percentiles are theirs instead of the batch's.
    Returns:
        :class:`FusedLabels`.
    """
    offline_label, online_label = offline_label.long(), online_label.long()
    has_offline = offline_label != ignore_index

    def certain(cert: Tensor, label: Tensor, stats: RunningClassHistogram | None, percentile: float) -> Tensor:
        if stats is None:
            return percentile_certain(cert, label, num_classes=num_classes, percentile=percentile,
                                      ignore_index=ignore_index)
        stats.update(cert, label)
        return stats.select(cert, label, percentile=percentile, ignore_index=ignore_index)[1] > 0

    off_ok = certain(offline_certainty, offline_label, offline_stats, offline_percentile)
    on_ok = certain(online_certainty, online_label, online_stats, online_percentile)
    from_online = has_offline & ~off_ok & on_ok
    label = torch.where(off_ok, offline_label, torch.where(from_online, online_label, ignore_index))
    zero = torch.zeros((), dtype=torch.float32, device=label.device)
    certainty = torch.where(off_ok, offline_certainty.float(),
                            torch.where(from_online, online_certainty.float(), zero))
    return FusedLabels(label, certainty, off_ok, from_online)


# --------------------------------------------------------------------------------------------------------------
# Cross-model transfer
# --------------------------------------------------------------------------------------------------------------


def uncertainty_weighted_fusion(probs: Sequence[Tensor], certainties: Sequence[Tensor], *,
                                eps: float = 1e-6) -> Tensor:
    """``sum_m w_m p_m`` with per-pixel weights ``w_m = (c_m + eps) / sum_k (c_k + eps)``.

    Args:
        probs: one ``(B, C, H, W)`` probability map per model.
        certainties: one ``(B, H, W)`` certainty in ``[0, 1]`` per model (e.g. ``1 - H_m / log C``).
        eps: keeps the weights defined (uniform) where every model is fully uncertain.
    Returns:
        ``(B, C, H, W)`` float32 probabilities (each pixel sums to 1 when the inputs do).
    """
    if not probs or len(probs) != len(certainties):
        raise ValueError(f"uncertainty_weighted_fusion: expected one certainty map per probability map, got "
                         f"{len(probs)} and {len(certainties)}")
    weights = torch.stack([c.float() for c in certainties]).clamp_min(0.0) + eps  # (M, B, H, W)
    weights = weights / weights.sum(0, keepdim=True)
    fused = torch.zeros_like(probs[0], dtype=torch.float32)
    for p, w in zip(probs, weights):
        if p.shape != probs[0].shape or w.shape != (p.shape[0], *p.shape[2:]):
            raise ValueError(f"uncertainty_weighted_fusion: shapes differ: probabilities {tuple(p.shape)} vs "
                             f"{tuple(probs[0].shape)}, certainty {tuple(w.shape)}")
        fused = fused + w[:, None] * p.float()
    return fused


class EnsembleLabeller(nn.Module):
    """Several adapted segmentation models as one labeller (UniSFDA's cross-model transfer).

    ``forward(x)`` with ``x`` ``(B, 3, H, W)`` RGB in ``[0, 1]`` returns ``log p`` ``(B, C, H, W)`` of the fused
    prediction at the input size, so that anything that takes logits (``build_offline_labels`` with
    ``uncertainty="entropy"`` stores ``argmax p`` and ``1 - H(p) / log C``) reads the fused probabilities. Each
    model normalises its input itself, so architectures with different normalisations mix freely.

    Args:
        models: segmentation models with one class count (eval mode is the caller's; ``build_offline_labels``
            sets it).
        passes: MC-dropout passes of each model's classifier (0: one deterministic pass and the softmax entropy).
        measure: ``"entropy"`` or ``"variance"`` (:func:`sfdaseg.offline_labels.mc_certainty`).
        weighting: ``"certainty"`` (:func:`uncertainty_weighted_fusion`) or ``"uniform"`` (plain mean).
        seed: the dropout masks are drawn from a generator seeded with it at every call (reproducible labels).
    """

    def __init__(self, models: Sequence[nn.Module], *, passes: int = 8, measure: str = "entropy",
                 weighting: str = "certainty", seed: int = 0) -> None:
        super().__init__()
        if not models:
            raise ValueError("EnsembleLabeller: expected at least one model")
        counts = sorted({int(m.num_classes) for m in models})
        if len(counts) > 1:
            raise ValueError(f"EnsembleLabeller: the models predict different numbers of classes {counts}")
        if measure not in MEASURES or weighting not in ("certainty", "uniform") or passes < 0:
            raise ValueError(f"EnsembleLabeller: expected passes >= 0, measure in {MEASURES} and weighting "
                             f"certainty|uniform, got {passes}, {measure!r}, {weighting!r}")
        self.models = nn.ModuleList(models)
        self.num_classes = counts[0]
        self.passes, self.measure, self.weighting, self.seed = int(passes), measure, weighting, int(seed)
        self.name = "unisfda_ensemble"
        self.build_args = {"models": [str(getattr(m, "name", type(m).__name__)) for m in models],
                           "passes": self.passes, "measure": measure, "weighting": weighting, "seed": self.seed}

    @torch.no_grad()
    def fused_probs(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` in ``[0, 1]`` -> fused probabilities ``(B, C, H, W)`` float32."""
        size = tuple(x.shape[-2:])
        generator = torch.Generator(device=x.device).manual_seed(self.seed) if self.passes else None
        probs, certs = [], []
        for m in self.models:
            if self.passes:
                r = mc_dropout(m, x, passes=self.passes, generator=generator, out_size=size)
                probs.append(r.mean_prob)
                certs.append(mc_certainty(r, measure=self.measure))
            else:
                p = torch.softmax(resize_logits(m(x), size).float(), dim=1)
                probs.append(p)
                certs.append(entropy_certainty(p))
        if self.weighting == "uniform":
            certs = [torch.ones_like(c) for c in certs]
        return uncertainty_weighted_fusion(probs, certs)

    def forward(self, x: Tensor) -> Tensor:
        return self.fused_probs(x).clamp_min(1e-12).log()


# --------------------------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------------------------


@dataclass
class UniSFDAConfig(CollapseConfig, StrongViewConfig, RecipeConfig):
    ema_momentum: float = param(0.999, ge=0.0, lt=1.0, origin="published", help="EMA teacher momentum")
    offline_scales: tuple[float, ...] = param((1.0,), gt=0.0, nonempty=True, origin="reconstructed",
                                              help="scales of the offline labeller (max fusion of the probabilities)")
    offline_uncertainty: str = choices("mc_dropout", "none", default="mc_dropout", origin="published",
                                       help="what the cache's confidence channel holds: MC-dropout certainty or max p")
    mc_passes: int = param(8, ge=1, origin="reconstructed", help="MC-dropout passes of the offline labeller")
    uncertainty_measure: str = choices(*MEASURES, default="entropy", origin="reconstructed",
                                       help="MC-dropout statistic behind a certainty")
    offline_cache: str | None = param(None, help="a finished cache folder (stage 2: the ensemble's); null: the "
                                                 "source model labels")
    offline_percentile: float = param(80.0, ge=0.0, le=100.0, origin="reconstructed",
                                      help="an offline label is certain in the top p% of its class's certainties")
    online_mc_passes: int = param(8, ge=0, origin="reconstructed",
                                  help="MC-dropout passes of the EMA teacher's classifier (0: softmax entropy)")
    online_percentile: float = param(80.0, ge=0.0, le=100.0, origin="reconstructed",
                                     help="an online label is certain in the top p% of its class's certainties")
    stats_momentum: float = param(0.99, ge=0.0, lt=1.0,
                                  help="memory of the running per-class certainty histograms behind both percentiles")
    pixel_weight: str = choices("certainty", "none", default="certainty", origin="reconstructed",
                                help="pixel weights of the CE: the label's certainty, or 1")
    # The strong view (sfdaseg.strong_view): UniSFDA's intra-domain style augmentation is on (Fourier, p 0.5);
    # ClassMix is not part of UniSFDA.
    style: str = choices("fourier", "adain", "none", default="fourier", origin="published",
                         help="intra-domain style swap of the student's view")
    classmix: bool = param(False, help="target-to-target ClassMix (not part of UniSFDA)")
    kd_weight: float = param(0.0, ge=0.0, help="stage 2: KL to the online soft ensemble of kd_teachers (0: off)")
    kd_teachers: list[str] = param(default_factory=list,
                                   help="adapted auxiliary checkpoints (the unisfda pipeline fills it)")
    kd_temperature: float = param(1.0, gt=0.0, help="temperature of the stage-2 KL")

    def validate(self) -> None:
        super().validate()
        if self.offline_cache and not Path(self.offline_cache).is_dir():
            raise ConfigError(f"method.offline_cache: no such folder: {self.offline_cache}")
        if self.kd_weight > 0 and not self.kd_teachers:
            raise ConfigError("method.kd_teachers: kd_weight > 0 needs the adapted auxiliary checkpoints "
                              "(the unisfda pipeline fills them in for stage 2)")

    def offline_labels(self) -> OfflineLabelRequest:
        """The source model's offline labels with what the confidence channel holds (keyed into the cache's
        fingerprint), or a finished cache (``offline_cache``, stage 2)."""
        options = {} if self.offline_uncertainty == "none" else {
            "uncertainty": "mc_dropout", "mc_passes": self.mc_passes, "measure": self.uncertainty_measure}
        return OfflineLabelRequest(scales=tuple(self.offline_scales), options=options, cache=self.offline_cache)


class UniSFDA(TeacherStudentTask):
    def __init__(self, ctx: AdaptContext, cfg: UniSFDAConfig) -> None:
        super().__init__(ctx.model, EMATeacher(ctx.model, momentum=cfg.ema_momentum), export=ctx.export)
        self.cfg = cfg
        self.num_classes = ctx.classes.num_classes
        self.ignore = ctx.classes.ignore_index
        self.view = StrongView(cfg, num_classes=self.num_classes, ignore_index=self.ignore)
        self.offline_stats = RunningClassHistogram(self.num_classes, momentum=cfg.stats_momentum).to(ctx.device)
        self.online_stats = RunningClassHistogram(self.num_classes, momentum=cfg.stats_momentum).to(ctx.device)
        self.reg = SourceRegularizer(cfg, source=ctx.model, target=ctx.target, num_classes=self.num_classes,
                                     device=ctx.device)
        warn_batch_level_parts(cfg, ctx.batch_size, "unisfda")
        self.kd_ensemble: EnsembleLabeller | None = None
        if cfg.kd_weight > 0:
            teachers, classes = load_teachers(cfg.kd_teachers, device=ctx.device)
            check_same_classes(classes, cfg.kd_teachers[0], ctx.classes, "the adapted model", what="method.kd_teachers")
            # Frozen and not a trainable module: the trainer neither steps nor saves it (rebuilt on resume).
            self.kd_ensemble = EnsembleLabeller(teachers, passes=cfg.online_mc_passes,
                                                measure=cfg.uncertainty_measure).eval()

    def frozen_modules(self) -> dict[str, nn.Module]:
        ensemble = {"kd_ensemble": self.kd_ensemble} if self.kd_ensemble is not None else {}
        return {**super().frozen_modules(), **ensemble}

    def state_dict(self):
        return {**super().state_dict(), "offline_stats": self.offline_stats.state_dict(),
                "online_stats": self.online_stats.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.offline_stats.load_state_dict(state["offline_stats"])
        self.online_stats.load_state_dict(state["online_stats"])

    def _online(self, x: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """The EMA teacher's label ``(B, H, W)`` long and certainty ``(B, H, W)`` float32 on the weak view."""
        cfg = self.cfg
        logits, feats = self.teacher(x, return_features=True)
        if cfg.online_mc_passes > 0:
            r = mc_dropout_features(self.teacher.module, feats, passes=cfg.online_mc_passes, out_size=size)
            return r.label, mc_certainty(r, measure=cfg.uncertainty_measure)
        probs = torch.softmax(resize_logits(logits, size).float(), dim=1)
        return probs.argmax(1), entropy_certainty(probs)

    def training_step(self, batch: dict, step: int) -> StepOutput:
        cfg = self.cfg
        x = to_model_input(batch["image"])  # (B, 3, H, W) weak view
        size = tuple(x.shape[-2:])
        valid = valid_pixels(batch)
        with torch.no_grad():
            online_label, online_cert = self._online(x, size)
            online_label = ignore_padding(online_label, batch, self.ignore)
            fused = fuse_online_offline(batch["pl_label"].long(), batch["pl_conf"].float() / 255.0, online_label,
                                        online_cert, num_classes=self.num_classes,
                                        offline_percentile=cfg.offline_percentile,
                                        online_percentile=cfg.online_percentile, ignore_index=self.ignore,
                                        offline_stats=self.offline_stats, online_stats=self.online_stats)
            label = fused.label
            kept = (label != self.ignore).float()
            weight = fused.certainty if cfg.pixel_weight == "certainty" else kept
            stats = pseudo_label_stats(label, fused.certainty, num_classes=self.num_classes, ignore_index=self.ignore)
            xs = self.view.perturb(x)  # appearance of another target image of the batch; labels stay aligned
            soft = None
            if self.kd_ensemble is not None:
                soft = torch.softmax(self.kd_ensemble(x) / cfg.kd_temperature, dim=1)  # log p / T -> p^(1/T) / Z
            maps = [m for m in (soft, self.reg.source_probs(x), None if valid is None else valid.float())
                    if m is not None]
            xs, label, weight, *maps = self.view.mix(label, xs, weight, *maps)
            soft = maps.pop(0) if soft is not None else None
            src = maps.pop(0) if self.reg.source is not None else None
            valid_mix = maps.pop(0) > 0.5 if valid is not None else None
        logits = self.net(xs)
        loss_ce = seg_cross_entropy(logits, label, ignore_index=self.ignore, pixel_weight=weight)
        logs = {"loss_ce": loss_ce.detach()}
        loss = loss_ce
        if soft is not None:
            loss_kd = kd_loss(logits, soft, temperature=cfg.kd_temperature,
                              pixel_weight=None if valid_mix is None else valid_mix.float())
            loss = loss + cfg.kd_weight * loss_kd
            logs["loss_kd"] = loss_kd.detach()
        if self.reg.active:
            loss_reg, reg_logs = self.reg.loss(logits, src, valid=valid_mix)
            loss = loss + loss_reg
            logs.update(reg_logs)
        valid = (batch["pl_label"] != self.ignore).float().mean().clamp_min(1e-6)
        logs.update({
            "pl/offline_frac": fused.from_offline.float().mean() / valid,  # of the pixels with an offline label
            "pl/online_frac": fused.from_online.float().mean() / valid,
            **{f"pl/{k}": v for k, v in stats.items()},
        })
        return StepOutput(loss, logs)


def build(ctx: AdaptContext, cfg: UniSFDAConfig) -> UniSFDA:
    return UniSFDA(ctx, cfg)
