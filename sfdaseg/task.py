"""The contract between the training loop and what it trains: :class:`Task`, :class:`TaskBase`, :class:`StepOutput`.

This module is a leaf (it imports only torch): the trainer (``sfdaseg.engine``) calls these methods, and every
objective (source training, each adaptation recipe, distillation) implements them, so neither side needs to
import the other.

A task computes a loss; the loop owns everything else (backward, AMP, accumulation, clipping, the optimizer and
LR schedule, DDP, checkpoints, resume, logs). Per optimizer step the loop calls::

    out = task.training_step(batch, step)     # under autocast; the task never calls backward() or step()
    scaler.scale(out.loss).backward(); optimizer.step()
    task.after_optimizer_step(step)            # e.g. the EMA teacher update

Required: :meth:`Task.trainable_modules`, :meth:`Task.wrap_trainable`, :meth:`Task.training_step` and
:meth:`Task.export_model`. :class:`TaskBase` gives no-op defaults for the optional parts, so a task subclasses it
and overrides only what it has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["StepOutput", "Task", "TaskBase", "WrapFn"]

#: ``wrap(name, module) -> module``: what the trainer hands a task to wrap a trainable module (DDP, compile).
WrapFn = Callable[[str, nn.Module], nn.Module]


@dataclass
class StepOutput:
    """What :meth:`Task.training_step` returns.

    Attributes:
        loss: scalar tensor with grad; the loop divides it by the accumulation count and calls backward.
        logs: detached tensors (scalars, or ``(C,)`` vectors such as class histograms), averaged over the log
            interval by the loop and read on the host once per interval.
    """

    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


@runtime_checkable
class Task(Protocol):
    """What the training loop calls. See the module docstring for the order of the calls."""

    def trainable_modules(self) -> dict[str, nn.Module]:
        """The modules the optimizer updates, by name (raw, unwrapped); saved in the training state."""
        ...

    def wrap_trainable(self, wrap: WrapFn) -> None:
        """Called once by the loop; the task then calls ``wrap(name, module)``'s result in its step."""
        ...

    def training_step(self, batch: dict, step: int) -> StepOutput:
        """The loss of one micro-batch (uint8 images and masks already on the device)."""
        ...

    def export_model(self) -> nn.Module:
        """The segmentation model the run delivers (the student, an EMA teacher, a small student, ...)."""
        ...

    def after_optimizer_step(self, step: int) -> None:
        """After each optimizer step (``step`` is 0-based): EMA updates and other non-gradient state."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Non-trainable state that must survive a resume (teachers, prototypes, running statistics)."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ...

    def param_groups(self) -> list[dict[str, Any]] | None:
        """Optimizer parameter groups, or ``None`` for the loop's default per-module backbone/head groups."""
        ...

    def extra_exports(self) -> dict[str, nn.Module]:
        """Models trained beside the delivered one, saved as ``RUN/<name>.ckpt`` (e.g. DUDA's large teacher)."""
        ...

    def frozen_modules(self) -> dict[str, nn.Module]:
        """Models the step runs but does not train (an EMA teacher, a frozen source model): the loop gives them the
        students' memory format and compile setting, so a teacher forward costs what a student forward costs."""
        ...


class TaskBase:
    """No-op defaults for the optional parts of :class:`Task`; subclasses implement the required four."""

    def after_optimizer_step(self, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def param_groups(self) -> list[dict[str, Any]] | None:
        return None

    def extra_exports(self) -> dict[str, nn.Module]:
        return {}

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {}
