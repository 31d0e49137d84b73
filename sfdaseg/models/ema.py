"""The mean teacher: an exponential moving average (EMA) of the student over its whole state.

After each optimizer step, :meth:`EMATeacher.update` moves every floating tensor of the teacher towards the
student's::

    m_t = min(1 - 1 / (t + 1), momentum)        # warm-up: the teacher follows the student closely at first
    theta_teacher = m_t * theta_teacher + (1 - m_t) * theta_student

"Every floating tensor" means parameters *and* floating buffers (BatchNorm ``running_mean`` /
``running_var``): a teacher that averages the weights but keeps the source model's BN statistics normalises
target features with statistics that no longer fit its weights. Integer buffers (``num_batches_tracked``)
are copied. Everything runs on the device with ``torch._foreach_lerp_``; nothing syncs with the host.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from sfdaseg.models.base import unwrap_model

__all__ = ["EMATeacher", "ema_momentum", "unwrap_model"]


def ema_momentum(step: int, momentum: float) -> float:
    """``min(1 - 1 / (step + 1), momentum)``: 0 at step 0 (the teacher becomes a copy of the student)."""
    return min(1.0 - 1.0 / (int(step) + 1), float(momentum))


class EMATeacher(nn.Module):
    """A frozen copy of the student that follows it by EMA.

    Args:
        student: the model to copy (a DDP / DataParallel / ``torch.compile`` wrapper is unwrapped first).
        momentum: the largest EMA momentum ``m_max`` (0.999 in DAFormer / DiGA / STvM).

    Attributes:
        module: the teacher model (same class as the student), always in eval mode, ``requires_grad=False``.
        momentum: ``m_max``.

    The teacher stays in eval mode whatever ``train(mode)`` is called with (the trainer may switch every task
    module to train mode): its BatchNorm layers use the running statistics and its dropout is off, so its
    pseudo-labels are deterministic. ``state_dict`` / ``load_state_dict`` are those of ``nn.Module`` (keys
    ``module.<name>``), which is what a resume needs.
    """

    def __init__(self, student: nn.Module, *, momentum: float = 0.999) -> None:
        super().__init__()
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"EMATeacher: momentum must be in [0, 1], got {momentum}")
        self.momentum = float(momentum)
        teacher = copy.deepcopy(unwrap_model(student))
        for p in teacher.parameters():
            p.grad = None  # deepcopy copies .grad too; the teacher never needs it
        teacher.requires_grad_(False)
        self.module = teacher
        super().train(False)

    def train(self, mode: bool = True) -> "EMATeacher":
        """Kept in eval mode regardless of ``mode`` (running BN statistics, no dropout); returns self."""
        return super().train(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Calls the teacher model (``teacher(x)`` -> logits, ``teacher(x, return_features=True)`` -> a pair)."""
        return self.module(*args, **kwargs)

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> None:
        """One EMA step after optimizer step ``step`` (0-based), with ``m = min(1 - 1/(step+1), momentum)``.

        Floating parameters and buffers: ``teacher.lerp_(student, 1 - m)`` (= ``m * teacher + (1-m) * student``);
        other buffers are copied. Raises ``ValueError`` when the student's tensors do not match the teacher's.
        """
        student = unwrap_model(student)
        m = ema_momentum(step, self.momentum)
        t_params = dict(self.module.named_parameters())
        s_params = dict(student.named_parameters())
        t_bufs = dict(self.module.named_buffers())
        s_bufs = dict(student.named_buffers())
        if t_params.keys() != s_params.keys() or t_bufs.keys() != s_bufs.keys():
            diff = sorted((set(t_params) ^ set(s_params)) | (set(t_bufs) ^ set(s_bufs)))
            raise ValueError(
                f"EMATeacher.update: the student's parameters/buffers differ from the teacher's "
                f"(e.g. {diff[:5]}); the teacher must be built from this student"
            )
        # Group by (device, dtype) so that each _foreach call gets homogeneous lists.
        groups: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        for table_t, table_s in ((t_params, s_params), (t_bufs, s_bufs)):
            for name, t in table_t.items():
                s = table_s[name].detach()
                if t.shape != s.shape:
                    raise ValueError(
                        f"EMATeacher.update: {name} has shape {tuple(s.shape)} in the student but "
                        f"{tuple(t.shape)} in the teacher"
                    )
                if t.is_floating_point():
                    if s.dtype != t.dtype or s.device != t.device:
                        s = s.to(device=t.device, dtype=t.dtype, non_blocking=True)
                    dst, src = groups.setdefault((t.device, t.dtype), ([], []))
                    dst.append(t.data if isinstance(t, nn.Parameter) else t)
                    src.append(s)
                else:
                    copies.append((t, s))
        weight = 1.0 - m
        for dst, src in groups.values():
            torch._foreach_lerp_(dst, src, weight)
        for t, s in copies:
            t.copy_(s, non_blocking=True)
