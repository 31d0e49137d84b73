"""Knowledge distillation: the pieces that ``sfdaseg distill``, the ``duda`` recipe and UniSFDA's stage 2 share.

- :func:`kd_loss`: pixel-wise ``T^2 * KL(p_teacher || softmax(z_student / T))`` (Hinton et al. 2015);
- :func:`teacher_logits`, :func:`average_probs`, :func:`average_teacher_probs`: several frozen teachers on one
  batch, their softmax outputs averaged (each teacher normalises the ``[0, 1]`` input itself, so teachers with
  different normalisations, ImageNet or Caffe BGR, mix freely);
- :func:`ramp`: a linear 0 -> 1 weight ramp over a fraction of the schedule;
- :func:`load_teachers`, :func:`build_student`: checked loading of teachers (one class space) and of a student;
- :class:`DistillationTask`: distillation alone, as a trainer task: frozen teachers, one trainable student.

Every function runs on the device without host syncs (no ``.item()``, no data-dependent shapes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from sfdaseg.augment import photometric_augment
from sfdaseg.data.classes import IGNORE_INDEX, ClassSpec
from sfdaseg.data.transforms import to_model_input
from sfdaseg.losses import resize_logits, seg_cross_entropy
from sfdaseg.models import build_model, load_model
from sfdaseg.storage import CheckpointError, peek_checkpoint_info
from sfdaseg.task import StepOutput, TaskBase, WrapFn

__all__ = [
    "DEFAULT_STUDENT",
    "DistillationTask",
    "average_probs",
    "average_teacher_probs",
    "build_student",
    "check_same_classes",
    "kd_loss",
    "load_teachers",
    "ramp",
    "teacher_logits",
]

DEFAULT_STUDENT = "lraspp_mobilenet_v3_large"


# --------------------------------------------------------------------------------------------------------------
# Losses and schedules
# --------------------------------------------------------------------------------------------------------------


def kd_loss(student_logits: Tensor, teacher_probs: Tensor, *, temperature: float = 1.0,
            pixel_weight: Tensor | None = None) -> Tensor:
    """Distillation loss ``T^2 * KL(p_t || softmax(z_s / T))`` per pixel, averaged over pixels.

    The ``T^2`` factor keeps the gradient's size independent of ``T`` (Hinton et al. 2015), so a temperature
    change does not silently change the loss weight. Unlike a soft cross-entropy, the KL is 0 when the student
    matches the teacher, so its value reads as "distance to the teacher".

    Args:
        student_logits: ``(B, C, h, w)``, upsampled here (bilinear) to the teacher's size.
        teacher_probs: ``(B, C, H, W)`` probabilities already softened with the same ``temperature`` (e.g.
            :func:`average_teacher_probs` with ``temperature=T``), no grad.
        temperature: ``T > 0``.
        pixel_weight: optional ``(B, H, W)`` non-negative weights (weighted mean).
    Returns:
        a scalar (float32).
    """
    if student_logits.dim() != 4 or teacher_probs.dim() != 4 or student_logits.shape[:2] != teacher_probs.shape[:2]:
        raise ValueError(f"kd_loss: expected student logits (B, C, h, w) and teacher probabilities (B, C, H, W) "
                         f"with the same B and C, got {tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}")
    if temperature <= 0:
        raise ValueError(f"kd_loss: temperature must be positive, got {temperature}")
    logits = resize_logits(student_logits, tuple(teacher_probs.shape[-2:])).float()
    log_q = torch.log_softmax(logits / temperature, dim=1)
    p = teacher_probs.detach().float()
    # xlogy: 0 * log 0 = 0 for classes the teacher rules out entirely.
    per_pixel = (torch.xlogy(p, p) - p * log_q).sum(1)  # (B, H, W), >= 0
    if pixel_weight is None:
        loss = per_pixel.mean()
    else:
        w = pixel_weight.float()
        loss = (per_pixel * w).sum() / w.sum().clamp_min(1e-6)
    return loss * (temperature * temperature)


def ramp(step: int, total: int, ramp_frac: float) -> float:
    """Linear ramp from 0 at ``step`` 0 to 1 at ``ramp_frac * total`` steps, then 1.

    ``ramp_frac <= 0`` (or ``total <= 0``) means no ramp: always 1. Multiply a loss weight by it.
    """
    length = float(ramp_frac) * float(total)
    if length <= 0:
        return 1.0
    return min(1.0, max(0.0, float(step) / length))


# --------------------------------------------------------------------------------------------------------------
# Several teachers
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def teacher_logits(teachers: Sequence[nn.Module], images: Tensor, *,
                   size: tuple[int, int] | None = None) -> list[Tensor]:
    """Each teacher's logits on ``images``, upsampled to one size (float32, no grad).

    Args:
        teachers: frozen models in eval mode (``SegmentationModel`` or an ``EMATeacher``); each maps RGB
            ``[0, 1]`` input to logits and applies its own input normalisation.
        images: ``(B, 3, H, W)`` float RGB in ``[0, 1]``.
        size: ``(H', W')`` of the returned logits; default the images' size.
    Returns:
        one ``(B, C, H', W')`` tensor per teacher. Raises ``ValueError`` when the teachers' class counts differ.
    """
    if not teachers:
        raise ValueError("teacher_logits: expected at least one teacher")
    size = tuple(size) if size is not None else tuple(images.shape[-2:])
    out = [resize_logits(t(images), size).float() for t in teachers]
    counts = [o.shape[1] for o in out]
    if len(set(counts)) > 1:
        raise ValueError(f"teacher_logits: the teachers predict different numbers of classes {counts}; they must "
                         "share one class space")
    return out


def average_probs(logits: Sequence[Tensor], *, temperature: float = 1.0,
                  weights: Sequence[float | Tensor] | None = None) -> Tensor:
    """``mean_k softmax(z_k / T)`` over a list of ``(B, C, H, W)`` logits -> ``(B, C, H, W)`` float32.

    Args:
        weights: optional, one per teacher: a float or a ``(B, H, W)`` non-negative map (e.g. an inverse
            uncertainty); the result is then ``sum_k w_k p_k / sum_k w_k`` per pixel (pixels where every weight
            is 0 get the plain mean).
    """
    if not logits:
        raise ValueError("average_probs: expected at least one logits tensor")
    if temperature <= 0:
        raise ValueError(f"average_probs: temperature must be positive, got {temperature}")
    if weights is None:
        total = torch.softmax(logits[0].float() / temperature, dim=1)
        for z in logits[1:]:
            total = total + torch.softmax(z.float() / temperature, dim=1)
        return total / len(logits)
    if len(weights) != len(logits):
        raise ValueError(f"average_probs: {len(weights)} weights for {len(logits)} teachers")
    total = torch.zeros_like(logits[0], dtype=torch.float32)
    norm = torch.zeros_like(logits[0][:, :1], dtype=torch.float32)  # (B, 1, H, W)
    plain = torch.zeros_like(total)
    for z, w in zip(logits, weights):
        p = torch.softmax(z.float() / temperature, dim=1)
        w = torch.as_tensor(w, dtype=torch.float32, device=p.device)
        w = w[:, None] if w.dim() == 3 else w  # (B, H, W) -> (B, 1, H, W); a scalar broadcasts
        total = total + w * p
        norm = norm + w
        plain = plain + p
    return torch.where(norm > 0, total / norm.clamp_min(1e-12), plain / len(logits))


@torch.no_grad()
def average_teacher_probs(teachers: Sequence[nn.Module], images: Tensor, *, size: tuple[int, int] | None = None,
                          temperature: float = 1.0) -> Tensor:
    """The teachers' softmax outputs at temperature ``T``, averaged: ``(B, C, H', W')`` float32.

    Averaging probabilities (not logits) keeps every teacher's vote on one scale whatever the size of its logits
    (models trained with different recipes or architectures have very different logit ranges).
    """
    return average_probs(teacher_logits(teachers, images, size=size), temperature=temperature)


# --------------------------------------------------------------------------------------------------------------
# Loading teachers and students
# --------------------------------------------------------------------------------------------------------------


def check_same_classes(a: ClassSpec, a_path: str | Path, b: ClassSpec, b_path: str | Path, *,
                       what: str = "teachers") -> None:
    """Raise ``CheckpointError`` naming both files when two class spaces differ (count or names)."""
    if a.num_classes != b.num_classes:
        raise CheckpointError(f"{what}: {a_path} predicts {a.num_classes} classes but {b_path} predicts "
                              f"{b.num_classes} classes; distillation needs one class space")
    if tuple(a.names) != tuple(b.names):
        diff = next(i for i, (x, y) in enumerate(zip(a.names, b.names)) if x != y)
        raise CheckpointError(f"{what}: {a_path} and {b_path} name their classes differently (class {diff}: "
                              f"{a.names[diff]!r} vs {b.names[diff]!r}); distillation needs one class space")


def load_teachers(paths: Sequence[str | Path], *, device: torch.device | str = "cpu"
                  ) -> tuple[list[nn.Module], ClassSpec]:
    """Load 1..N teacher checkpoints, frozen (eval mode, no grad) on ``device``; return them and their classes.

    Every teacher keeps its own architecture and input normalisation. Teachers whose class spaces differ are
    refused with a ``CheckpointError`` that names both files.
    """
    if not paths:
        raise CheckpointError("teachers: expected at least one teacher checkpoint")
    models: list[nn.Module] = []
    first: tuple[Path, ClassSpec] | None = None
    for p in paths:
        p = Path(p)
        model, info = load_model(p, map_location="cpu")
        if first is None:
            first = (p, info.classes)
        else:
            check_same_classes(first[1], first[0], info.classes, p)
        model.requires_grad_(False)
        models.append(model.to(device).eval())
    assert first is not None
    return models, first[1]


def build_student(name: str | None, *, classes: ClassSpec, checkpoint: str | Path | None = None,
                  options: Mapping[str, Any] | None = None, default: str = DEFAULT_STUDENT,
                  keys: tuple[str, str] = ("model", "student_checkpoint")):
    """The student: architecture ``name``, initialised from ``checkpoint`` when given, else randomly.

    Args:
        name: registered model name; ``None`` takes the architecture of ``checkpoint`` (an sfdaseg checkpoint),
            else ``default``.
        classes: the teachers' class space; an sfdaseg ``checkpoint`` must have the same classes.
        checkpoint: an sfdaseg checkpoint (its architecture options and normalisation are used; ``options``
            override them) or a local foreign weights file of architecture ``name`` (e.g. an ImageNet backbone
            state dict); nothing is downloaded.
        options: builder options (e.g. ``{"width": 8}`` for ``tiny``).
        keys: the config keys of ``name`` and ``checkpoint``, for error messages.
    Returns:
        a ``SegmentationModel`` with ``classes.num_classes`` outputs, on the CPU.
    """
    if checkpoint:
        info = peek_checkpoint_info(checkpoint)
        if info is not None:
            if name and name != info.name:
                raise CheckpointError(f"{keys[0]}: {name!r}, but {keys[1]} {checkpoint} holds a {info.name!r} "
                                      "model (leave the architecture unset to take the checkpoint's)")
            name = info.name
            check_same_classes(info.classes, checkpoint, classes, "the teacher", what=keys[1])
        elif not name:
            raise CheckpointError(f"{keys[1]}: {checkpoint} is not an sfdaseg checkpoint, so it does not say "
                                  f"which architecture it holds: set {keys[0]}")
    return build_model(name or default, num_classes=classes.num_classes, weights=checkpoint or None,
                       **dict(options or {}))


# --------------------------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------------------------


class DistillationTask(TaskBase):
    """Distil frozen teachers into one trainable student on unlabelled target images (a trainer task).

    Per step, on a batch ``x`` of target crops: the teachers' softmax outputs at temperature ``T`` are averaged
    (``p_T``), and at ``T = 1`` for the hard labels ``y = argmax p_1``;

        loss = kd_weight * kd_loss(student(x'), p_T, T) + ce_weight * CE(student(x'), y)

    where ``x'`` is ``x`` itself, or ``x`` after batched photometric augmentation when ``photometric`` (the
    teachers always see the clean ``x``: the student learns to give the clean answer on a perturbed view).

    Args:
        student: the model trained (its parameters are the only ones the optimizer sees).
        teachers: frozen models (eval mode, ``requires_grad=False``), see :func:`load_teachers`.
        temperature: ``T`` of the KL term.
        kd_weight, ce_weight: weights of the two terms (CE on the averaged hard labels is off by default).
        ignore_index: never produced by the teachers' argmax; kept for padded crops of the data pipeline.
        photometric: perturb the student's view.
    """

    def __init__(self, student: nn.Module, teachers: Sequence[nn.Module], *, temperature: float = 1.0,
                 kd_weight: float = 1.0, ce_weight: float = 0.0, ignore_index: int = IGNORE_INDEX,
                 photometric: bool = False) -> None:
        if not teachers:
            raise ValueError("DistillationTask: expected at least one teacher")
        if temperature <= 0:
            raise ValueError(f"DistillationTask: temperature must be positive, got {temperature}")
        self.student = student
        self.teachers = list(teachers)
        for t in self.teachers:
            t.requires_grad_(False)
            t.eval()
        self.temperature = float(temperature)
        self.kd_weight, self.ce_weight = float(kd_weight), float(ce_weight)
        self.ignore = ignore_index
        self.photometric = photometric
        self.net: nn.Module = student

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def wrap_trainable(self, wrap: WrapFn) -> None:
        self.net = wrap("student", self.student)

    def training_step(self, batch: dict, step: int) -> StepOutput:
        x = to_model_input(batch["image"])  # (B, 3, H, W)
        with torch.no_grad():
            logits = teacher_logits(self.teachers, x)
            p_t = average_probs(logits, temperature=self.temperature)
            p_1 = p_t if self.temperature == 1.0 else average_probs(logits, temperature=1.0)
            conf, label = p_1.max(1)  # (B, H, W): the averaged hard labels and their confidence
            del logits
            xs = photometric_augment(x) if self.photometric else x
        s = resize_logits(self.net(xs), tuple(x.shape[-2:]))
        valid = batch.get("valid")  # 0 on crop padding: the teachers' output there teaches nothing
        if valid is not None:
            label = torch.where(valid.bool(), label, self.ignore)
        loss_kd = kd_loss(s, p_t, temperature=self.temperature, pixel_weight=None if valid is None else valid.float())
        loss = self.kd_weight * loss_kd
        logs = {"loss_kd": loss_kd.detach(), "teacher_conf": conf.mean()}
        if self.ce_weight > 0:
            loss_ce = seg_cross_entropy(s, label, ignore_index=self.ignore)
            loss = loss + self.ce_weight * loss_ce
            logs["loss_ce"] = loss_ce.detach()
        with torch.no_grad():
            logs["agreement"] = (s.detach().argmax(1) == label).float().mean()
        return StepOutput(loss, logs)

    # No task state: the teachers are frozen files, reloaded on resume; the student is saved by the trainer.

    def export_model(self) -> nn.Module:
        return self.student
