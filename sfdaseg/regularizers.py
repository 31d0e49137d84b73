"""Collapse prevention for self-training, label-free: a class-prior term and an anchor to the frozen source model.

Self-training on its own pseudo-labels has a well-known failure: the minority classes vanish into the background
and one large class, the teacher grows ever more confident, and nothing in the loss notices. Two terms counter it
without any target label (every recipe with a student can use both; :class:`CollapseConfig` holds their keys):

- **class prior** (``prior_weight``): ``KL(prior || mean_pixels p_student)`` on the batch. With
  ``prior="source"`` the prior is the frozen source model's mean prediction on target images (measured once, at
  the start); with ``prior="uniform"`` the term is ``log C - H(mean p)``, the diversity term of information
  maximisation (SHOT, Liang et al. 2020). A class can still shrink or grow, but the student pays for making it
  disappear from the batch.
- **source anchor** (``anchor_weight``): ``KL(p_source || p_student)`` per pixel, averaged over the image pixels:
  the student may move away from the frozen source model only where the self-training signal outweighs it.
  The source model sees the clean (weak) view; its probabilities travel with the same ClassMix mask as the
  pseudo-labels, so they line up with the student's strong view.

Both are ours as components (the mechanisms are standard); their weights are ``method.*`` options.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sfdaseg.config_base import ConfigError, Section, choices, param
from sfdaseg.data.transforms import collate, to_model_input
from sfdaseg.losses import resize_logits

__all__ = ["CollapseConfig", "SourceRegularizer", "class_prior_loss", "source_anchor_loss", "source_class_prior"]


def class_prior_loss(probs: Tensor, prior: Tensor, *, valid: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """``KL(prior || p_bar)`` with ``p_bar`` the mean of ``probs`` ``(B, C, H, W)`` over the (valid) pixels.

    ``prior`` ``(C,)`` sums to 1. For a uniform prior this is ``log C - H(p_bar)`` (information maximisation's
    diversity term).
    """
    p = probs.float()
    if valid is None:
        p_bar = p.mean((0, 2, 3))
    else:
        w = valid.float()[:, None]
        p_bar = (p * w).sum((0, 2, 3)) / w.sum().clamp_min(1.0)
    q = prior.to(p_bar)
    return (q * (torch.log(q.clamp_min(eps)) - torch.log(p_bar.clamp_min(eps)))).sum()


def source_anchor_loss(student_logits: Tensor, source_probs: Tensor, *, valid: Tensor | None = None) -> Tensor:
    """Mean over the (valid) pixels of ``KL(p_source || softmax(student))``; logits upsampled to the probs' size."""
    logits = resize_logits(student_logits, tuple(source_probs.shape[-2:])).float()
    p = source_probs.detach().float()
    per_pixel = (torch.xlogy(p, p) - p * torch.log_softmax(logits, dim=1)).sum(1)  # (B, H, W), >= 0
    if valid is None:
        return per_pixel.mean()
    w = valid.float()
    return (per_pixel * w).sum() / w.sum().clamp_min(1.0)


@torch.no_grad()
def source_class_prior(model: nn.Module, dataset, *, images: int, device: torch.device, batch_size: int = 8) -> Tensor:
    """The mean softmax ``(C,)`` of ``model`` over the first ``images`` samples of ``dataset`` (no label read)."""
    was_training = model.training
    model.eval()
    total, pixels = None, 0
    n = min(int(images), len(dataset))
    try:
        for start in range(0, n, batch_size):
            batch = collate([dataset[i] for i in range(start, min(n, start + batch_size))])
            ims = batch["image"]
            for im in (ims if isinstance(ims, list) else [ims]):  # images of different sizes: one by one
                im = im if im.dim() == 4 else im[None]
                x = to_model_input(im.to(device))
                probs = torch.softmax(resize_logits(model(x), tuple(x.shape[-2:])).float(), dim=1)
                s = probs.sum((0, 2, 3)).double()
                total = s if total is None else total + s
                pixels += probs.shape[0] * probs.shape[2] * probs.shape[3]
    finally:
        model.train(was_training)
    if total is None:
        raise ValueError("source_class_prior: no target image to measure the prior on")
    return (total / pixels).float()


PRIORS = ("source", "uniform")


@dataclass
class CollapseConfig(Section):
    """The collapse-prevention keys of a recipe's ``method:`` section (see the module docstring); a recipe's
    config inherits it and may redeclare a field with its own default."""

    key_prefix: ClassVar[str] = "method."

    prior_weight: float = param(0.0, ge=0.0, help="weight of KL(prior || mean student prediction) (0: off)")
    prior: str = choices(*PRIORS, default="source", help="the class marginal the student is kept near")
    prior_images: int = param(64, ge=1, help="target images the source model's class marginal is measured on")
    anchor_weight: float = param(0.0, ge=0.0, help="weight of KL(p_source || p_student) per pixel (0: off)")


class SourceRegularizer(nn.Module):
    """The two terms for one recipe: holds the prior ``(C,)`` and, when anchoring, a frozen copy of the source.

    Args:
        source: the source model (copied and frozen here when ``anchor_weight > 0``; call before any step).
        target: the unlabelled target dataset (native size) the source prior is measured on.
        frozen: a frozen copy of the source the recipe already keeps (used as the anchor instead of a new copy).
    """

    prior: Tensor

    def __init__(self, cfg: CollapseConfig, *, source: nn.Module, target, num_classes: int,
                 device: torch.device, frozen: nn.Module | None = None) -> None:
        super().__init__()
        self.prior_weight, self.anchor_weight = float(cfg.prior_weight), float(cfg.anchor_weight)
        prior = torch.full((num_classes,), 1.0 / num_classes)
        if self.prior_weight > 0 and cfg.prior == "source":
            if target is None:
                raise ConfigError("method.prior=source: the target images are needed to measure the source prior")
            prior = source_class_prior(source, target, images=cfg.prior_images, device=device)
        self.register_buffer("prior", prior.to(device))
        self.source: nn.Module | None = None
        if self.anchor_weight > 0:
            self.source = frozen if frozen is not None else copy.deepcopy(source).requires_grad_(False).eval().to(device)

    @property
    def active(self) -> bool:
        return self.prior_weight > 0 or self.anchor_weight > 0

    @torch.no_grad()
    def source_probs(self, x: Tensor) -> Tensor | None:
        """The frozen source's probabilities ``(B, C, H, W)`` on ``x`` (the weak view), or None (no anchor)."""
        if self.source is None:
            return None
        return torch.softmax(resize_logits(self.source(x), tuple(x.shape[-2:])).float(), dim=1)

    def loss(self, student_logits: Tensor, source_probs: Tensor | None, *, valid: Tensor | None = None
             ) -> tuple[Tensor, dict[str, Tensor]]:
        """``prior_weight * class_prior + anchor_weight * anchor`` on the student's view, and the parts' logs.

        ``student_logits`` ``(B, C, h, w)``; ``source_probs`` the (mixed) source probabilities at the pseudo-label
        size, or None; ``valid`` ``(B, H, W)`` the image pixels (not padding).
        """
        size = tuple(valid.shape[-2:]) if valid is not None else (
            tuple(source_probs.shape[-2:]) if source_probs is not None else tuple(student_logits.shape[-2:]))
        total = student_logits.new_zeros((), dtype=torch.float32)
        logs: dict[str, Tensor] = {}
        if self.prior_weight > 0:
            probs = torch.softmax(resize_logits(student_logits, size).float(), dim=1)
            prior_term = class_prior_loss(probs, self.prior, valid=valid)
            total = total + self.prior_weight * prior_term
            logs["loss_prior"] = prior_term.detach()
        if self.anchor_weight > 0 and source_probs is not None:
            anchor = source_anchor_loss(student_logits, source_probs, valid=valid)
            total = total + self.anchor_weight * anchor
            logs["loss_anchor"] = anchor.detach()
        return total, logs
