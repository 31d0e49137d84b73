"""What the adaptation recipes share: the context they are built in, their config base, and the teacher-student
plumbing. Recipes import nothing from :mod:`sfdaseg.engine`: the loop calls them through :class:`sfdaseg.task.Task`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from sfdaseg.config_base import Section
from sfdaseg.data.classes import ClassSpec
from sfdaseg.task import TaskBase, WrapFn

__all__ = ["AdaptContext", "OfflineLabelRequest", "RecipeConfig", "TeacherStudentTask", "ignore_padding",
           "valid_pixels", "warn_batch_level_parts"]

logger = logging.getLogger(__name__)


def warn_batch_level_parts(cfg: Any, batch_size: int | None, recipe: str) -> None:
    """Warn once at build time when a part of the strong view cannot act on ``batch_size`` images per process.

    ClassMix pastes between images of a batch and the style swap borrows another image's style: with one image
    per process both do nothing (the image is mixed with, or re-styled by, itself).
    """
    if batch_size is None or batch_size > 1:
        return
    off = [name for name, on in (("ClassMix (method.classmix)", getattr(cfg, "classmix", False)),
                                 ("the style swap (method.style)", getattr(cfg, "style", "none") != "none")) if on]
    if off:
        logger.warning(f"{recipe}: {' and '.join(off)} need at least 2 images per process; with data.batch_size=1 "
                       f"they do nothing (raise data.batch_size, e.g. with train.accumulate to keep the global "
                       f"batch, or switch them off)")


def valid_pixels(batch: dict) -> torch.Tensor | None:
    """``(B, H, W)`` bool: the pixels of the images (not the padding a random crop added), or None (no padding)."""
    valid = batch.get("valid")
    return None if valid is None else valid.bool()


def ignore_padding(label: torch.Tensor, batch: dict, ignore_index: int) -> torch.Tensor:
    """``label`` ``(B, H, W)`` with ``ignore_index`` on the crop padding: a teacher's argmax on black padding is not
    a pseudo-label (offline labels carry 255 there already; online ones need this)."""
    valid = valid_pixels(batch)
    return label if valid is None else torch.where(valid, label, ignore_index)


@dataclass
class AdaptContext:
    """Everything a recipe may need to build its task.

    Attributes:
        model: the student, initialised from the source checkpoint, already on ``device``.
        classes: the class space of the source model.
        device: the training device.
        export: ``"teacher"`` or ``"student"``: which model ``export_model()`` returns.
        target: the unlabelled target dataset at native size, no transform (with ``pl_label``/``pl_conf`` when
            the recipe asked for offline pseudo-labels); for set-up passes such as prototype initialisation.
        run_dir: the run folder.
        iters: the run's number of optimizer steps (schedules inside a recipe refer to it).
        is_main: this process is rank 0 (or the only one): it writes files such as image grids.
        batch_size: images per process and step (batch-level parts such as ClassMix need at least 2).
    """

    model: nn.Module
    classes: ClassSpec
    device: torch.device
    export: str
    target: Dataset | None = None
    run_dir: Path | None = None
    iters: int | None = None
    is_main: bool = True
    batch_size: int | None = None  # images per process and step


@dataclass(frozen=True)
class OfflineLabelRequest:
    """What a recipe asks ``sfdaseg adapt`` to prepare: offline pseudo-labels of the frozen source model.

    Attributes:
        scales: test-time scales of the labeller (fused by :func:`sfdaseg.offline_labels.build_offline_labels`).
        options: extra keyword arguments of ``build_offline_labels`` (what the confidence channel holds); they key
            the cache's fingerprint.
        cache: a finished cache folder to read as it is (e.g. an ensemble's), instead of labelling.
    """

    scales: tuple[float, ...] = (1.0,)
    options: dict[str, Any] = field(default_factory=dict)
    cache: str | None = None


class RecipeConfig(Section):
    """Base of every recipe's ``method:`` dataclass (fields declared with ``param`` / ``choices``, so that the
    loader checks their ranges and ``sfdaseg adapt --recipe R --help`` lists them): the optional parts a run
    function reads.

    ``validate()`` is called by the config loader (ranges of every key; a recipe calls ``super().validate()`` so
    that the mixins it inherits, e.g. the strong view, check theirs); ``offline_labels()`` says whether the recipe
    trains on offline pseudo-labels (``None``: it does not).
    """

    key_prefix: ClassVar[str] = "method."

    def offline_labels(self) -> OfflineLabelRequest | None:
        return None


class TeacherStudentTask(TaskBase):
    """Plumbing shared by the EMA-teacher recipes: no loss lives here, and recipes never inherit from each other.

    Holds the student (trained), its EMA teacher and any extra trainable modules; wraps the trainable ones when
    the trainer asks; exports the student or the teacher; saves the teacher (and extra non-trainable state) for a
    resume. Recipes call ``self.net(x)`` for the (possibly DDP-wrapped) student.
    """

    def __init__(self, model: nn.Module, teacher: nn.Module, *, export: str,
                 extra_trainable: dict[str, nn.Module] | None = None) -> None:
        self.student = model
        self.teacher = teacher
        self.export = export
        self.extra = dict(extra_trainable or {})
        self.net: nn.Module = model
        self.wrapped: dict[str, nn.Module] = {}

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"student": self.student, **self.extra}

    def wrap_trainable(self, wrap: WrapFn) -> None:
        self.net = wrap("student", self.student)
        self.wrapped = {k: wrap(k, m) for k, m in self.extra.items()}

    def after_optimizer_step(self, step: int) -> None:
        self.teacher.update(self.student, step)

    def frozen_modules(self) -> dict[str, nn.Module]:
        frozen = {"teacher": self.teacher}
        source = getattr(getattr(self, "reg", None), "source", None)  # the collapse regularizer's anchor
        if source is not None:
            frozen["source"] = source
        return frozen

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])

    def export_model(self) -> nn.Module:
        return self.teacher.module if self.export == "teacher" else self.student
