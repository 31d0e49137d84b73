"""The student's strong view, shared by every recipe that has one: style swap -> photometric jitter -> ClassMix.

Self-training recipes (selftrain, stvm, diga_sf, duda, unisfda) show the student a perturbed, mixed version of
the batch the teacher labelled. The three steps, in this order, all batched on the device:

1. intra-domain style swap (:mod:`sfdaseg.style`): an image takes the low-frequency Fourier amplitude (or the
   AdaIN statistics) of another target image of the batch, with probability ``style_p``;
2. photometric augmentation (:func:`sfdaseg.augment.photometric_augment`): colour jitter of strength ``jitter``
   (brightness, contrast, saturation), hue rotation up to ``hue`` of a turn, grayscale, blur;
3. target-to-target ClassMix (:func:`sfdaseg.augment.classmix`): half of the classes of one image pasted onto
   another; labels, pixel weights and any per-pixel map move with the pixels.

Steps 1-2 change appearance only (:meth:`StrongView.perturb`), step 3 geometry (:meth:`StrongView.mix`), so a
recipe that needs the perturbed but unmixed view (diga_sf's reverse distillation) calls them separately. A recipe's
config inherits :class:`StrongViewConfig`, so the keys are the same everywhere (``method.classmix``,
``method.style``, ...), with per-recipe defaults where the recipe's paper differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from sfdaseg.augment import classmix, classmix_masks, photometric_augment
from sfdaseg.config_base import Section, choices, param
from sfdaseg.style import STYLE_KINDS, StyleConfig, build_style_augment

__all__ = ["StrongView", "StrongViewConfig"]


@dataclass
class StrongViewConfig(Section):
    """The strong-view keys of a recipe's ``method:`` section (see the module docstring)."""

    key_prefix: ClassVar[str] = "method."

    classmix: bool = param(True, origin="published", help="target-to-target ClassMix (DACS / DAFormer)")
    photometric: bool = param(True, origin="published", help="colour jitter, grayscale, blur (DAFormer)")
    jitter: float = param(0.2, ge=0.0, le=1.0, origin="published",
                          help="colour-jitter strength: brightness, contrast, saturation factors in [1-j, 1+j]")
    hue: float = param(0.0, ge=0.0, le=0.5, help="hue rotation, in turns (0: none)")
    style: str = choices(*STYLE_KINDS, default="none", help="intra-domain style swap of the student's view")
    style_p: float = param(0.5, ge=0.0, le=1.0, origin="reconstructed", help="probability that an image is re-styled")
    style_beta: float = param(0.01, ge=0.0, le=0.5, origin="published",
                              help="fourier: half-size of the swapped low-frequency band, fraction of the short side "
                                   "(FDA's L)")
    style_alpha: float | None = param(1.0, ge=0.0, le=1.0, origin="published",
                                      help="weight of the donor's style (1: full swap); null: U(0, 1) per image")

    def validate(self) -> None:
        super().validate()
        self.style_config().validate("method.style")

    def style_config(self) -> StyleConfig:
        return StyleConfig(kind=self.style, beta=self.style_beta, alpha=self.style_alpha, p=self.style_p)


class StrongView:
    """Applies a :class:`StrongViewConfig` to batches (no host sync; randomness from the global RNG)."""

    def __init__(self, cfg: StrongViewConfig, *, num_classes: int, ignore_index: int) -> None:
        self.cfg = cfg
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.style = build_style_augment(cfg.style_config()) if cfg.style != "none" else None

    def perturb(self, x: Tensor) -> Tensor:
        """Appearance only: ``(B, 3, H, W)`` in ``[0, 1]`` -> the same shape (labels stay aligned)."""
        cfg = self.cfg
        if self.style is not None:
            x = self.style(x)
        if cfg.photometric:
            x = photometric_augment(x, brightness=cfg.jitter, contrast=cfg.jitter, saturation=cfg.jitter,
                                    hue=cfg.hue)
        return x

    def mix(self, label: Tensor, x: Tensor, *maps: Tensor, class_scores: Tensor | None = None) -> tuple[Tensor, ...]:
        """ClassMix (when on): masks from ``label`` ``(B, H, W)``; returns ``(x, label, *maps)`` mixed alike.

        ``class_scores`` ``(B, C)`` bias which classes are pasted (STvM's MOCM).
        """
        if not self.cfg.classmix:
            return (x, label, *maps)
        mask = classmix_masks(label, num_classes=self.num_classes, ignore_index=self.ignore_index,
                              class_scores=class_scores)
        x, label, *maps = classmix(mask, x, label, *maps)
        return (x, label, *maps)

    @torch.no_grad()
    def __call__(self, x: Tensor, label: Tensor, *maps: Tensor, class_scores: Tensor | None = None
                 ) -> tuple[Tensor, ...]:
        """:meth:`perturb` then :meth:`mix`: ``(x_strong, label, *maps)``."""
        return self.mix(label, self.perturb(x), *maps, class_scores=class_scores)
