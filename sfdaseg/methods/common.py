"""What the adaptation recipes share: the context they are built in, their config base, and the teacher-student
plumbing. Recipes import nothing from :mod:`sfdaseg.engine`: the loop calls them through :class:`sfdaseg.task.Task`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from sfdaseg.data.classes import ClassSpec
from sfdaseg.task import TaskBase, WrapFn

__all__ = ["AdaptContext", "OfflineLabelRequest", "RecipeConfig", "TeacherStudentTask"]


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
    """

    model: nn.Module
    classes: ClassSpec
    device: torch.device
    export: str
    target: Dataset | None = None
    run_dir: Path | None = None
    iters: int | None = None
    is_main: bool = True


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


class RecipeConfig:
    """Base of every recipe's ``method:`` dataclass: the optional parts a run function reads.

    ``validate()`` is called by the config loader (ranges of every key); ``offline_labels()`` says whether the
    recipe trains on offline pseudo-labels (``None``: it does not).
    """

    def validate(self) -> None:
        pass

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

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.teacher.load_state_dict(state["teacher"])

    def export_model(self) -> nn.Module:
        return self.teacher.module if self.export == "teacher" else self.student
