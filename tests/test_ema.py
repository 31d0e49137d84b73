"""EMA teacher: warm-up momentum, parameters and buffers averaged, frozen, eval mode, state dict round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sfdaseg.models.ema import EMATeacher, ema_momentum, unwrap_model


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout2d(0.5)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.bn(self.conv(x))))


class Wrapper(nn.Module):
    """Stand-in for DistributedDataParallel: the real model under ``.module``."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *a, **kw):
        return self.module(*a, **kw)


def perturb(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            t.add_(torch.randn(t.shape, generator=g))
    model.bn.num_batches_tracked.add_(7)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_momentum_formula():
    assert ema_momentum(0, 0.999) == 0.0
    assert ema_momentum(1, 0.999) == pytest.approx(0.5)
    assert ema_momentum(9, 0.999) == pytest.approx(0.9)
    assert ema_momentum(100_000, 0.999) == pytest.approx(0.999)


def test_step0_copies_student_and_step_t_averages_params_and_buffers():
    torch.manual_seed(0)
    student = Net()
    teacher = EMATeacher(student, momentum=0.99)
    perturb(student, 1)
    teacher.update(student, 0)  # m = 0: a copy
    for k, v in student.state_dict().items():
        assert torch.equal(teacher.module.state_dict()[k], v), k

    before_t, before_s = state(teacher.module), None
    perturb(student, 2)
    before_s = state(student)
    step = 3
    m = min(1 - 1 / (step + 1), 0.99)  # 0.75
    teacher.update(student, step)
    after = teacher.module.state_dict()
    for k, v in after.items():
        if v.is_floating_point():
            expected = m * before_t[k] + (1 - m) * before_s[k]
            torch.testing.assert_close(v, expected, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(v, before_s[k]), k  # num_batches_tracked copied
    # BN running statistics are averaged, not frozen at the source values
    assert not torch.equal(after["bn.running_mean"], before_t["bn.running_mean"])


def test_momentum_is_capped():
    torch.manual_seed(0)
    student = Net()
    teacher = EMATeacher(student, momentum=0.5)
    before_t = state(teacher.module)
    perturb(student, 3)
    teacher.update(student, 1000)  # 1 - 1/1001 > 0.5: capped at 0.5
    w = teacher.module.conv.weight
    torch.testing.assert_close(w, 0.5 * before_t["conv.weight"] + 0.5 * student.conv.weight.detach())


def test_teacher_is_frozen_and_stays_in_eval_mode():
    student = Net()
    out = student(torch.rand(2, 3, 8, 8)).sum()
    out.backward()  # the student has grads; the copy must not inherit them
    teacher = EMATeacher(student)
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.module.training
    assert all(not m.training for m in teacher.modules())
    # eval mode: dropout off and running BN statistics, so two calls agree
    x = torch.rand(2, 3, 8, 8)
    y1, y2 = teacher(x), teacher(x)
    assert torch.equal(y1, y2) and not y1.requires_grad
    assert student.training  # the student is untouched


def test_update_through_ddp_like_wrapper():
    torch.manual_seed(0)
    student = Net()
    wrapped = Wrapper(student)
    teacher = EMATeacher(wrapped, momentum=0.9)
    assert type(teacher.module) is Net  # unwrapped before the copy
    assert unwrap_model(Wrapper(Wrapper(student))) is student
    perturb(student, 4)
    teacher.update(wrapped, 0)
    assert torch.equal(teacher.module.conv.weight, student.conv.weight)


def test_update_rejects_another_architecture():
    teacher = EMATeacher(Net())
    with pytest.raises(ValueError, match="differ"):
        teacher.update(nn.Linear(2, 2), 1)


def test_state_dict_round_trip():
    torch.manual_seed(0)
    student = Net()
    teacher = EMATeacher(student)
    perturb(student, 5)
    teacher.update(student, 4)
    sd = teacher.state_dict()
    assert "module.bn.running_var" in sd and "module.conv.weight" in sd
    other = EMATeacher(Net())
    other.load_state_dict(sd)
    for k, v in sd.items():
        assert torch.equal(other.state_dict()[k], v), k


def test_works_with_the_tiny_segmentation_model():
    from sfdaseg.models import build_model

    student = build_model("tiny", num_classes=5, width=8)
    teacher = EMATeacher(student)
    logits, feats = teacher(torch.rand(1, 3, 32, 32), return_features=True)
    assert logits.shape == (1, 5, 8, 8) and feats.shape == (1, 16, 8, 8)
    teacher.update(student, 10)
