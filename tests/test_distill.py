"""Distillation: the KD loss, averaging several teachers, and ``sfdaseg distill`` end to end."""

import json

import pytest
import torch
import torch.nn.functional as F

from sfdaseg.cli import COMMANDS, main
from sfdaseg.data.classes import CITYSCAPES19, ClassSpec
from sfdaseg.distill import (DistillationTask, average_teacher_probs, build_student, kd_loss, load_teachers,
                             teacher_logits)
from sfdaseg.models import load_model, save_model
from sfdaseg.storage import CheckpointError
from sfdaseg.models import build_model

COMMON = ["data.synthetic={size: [32, 64], length: 8}", "data.crop=[32,64]", "data.batch_size=2",
          "data.num_workers=0", "train.progress=false", "train.tensorboard=false", "train.log_every=1",
          "--device", "cpu"]


def _save(path, width, *, seed=0, classes=CITYSCAPES19, normalization="imagenet"):
    torch.manual_seed(seed)
    model = build_model("tiny", num_classes=classes.num_classes, width=width, normalization=normalization)
    save_model(path, model, classes=classes)
    return path


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    # Two teachers with different widths and input normalisations (ImageNet RGB vs Caffe BGR).
    return [_save(root / "a.ckpt", 8), _save(root / "b.ckpt", 6, seed=1, normalization="caffe")]


def test_kd_loss_is_the_scaled_kl_and_zero_at_the_teacher():
    torch.manual_seed(0)
    z_s, z_t = torch.randn(2, 5, 4, 6), torch.randn(2, 5, 8, 12)
    t = 3.0
    p = torch.softmax(z_t / t, dim=1)
    up = F.interpolate(z_s, size=(8, 12), mode="bilinear", align_corners=False)
    ref = F.kl_div(torch.log_softmax(up / t, dim=1), p, reduction="none").sum(1).mean() * t * t
    assert torch.allclose(kd_loss(z_s, p, temperature=t), ref, atol=1e-6)
    assert kd_loss(z_t, p, temperature=t).abs() < 1e-5  # the student equals the teacher: no loss
    w = torch.zeros(2, 8, 12)
    w[0] = 1.0
    ref0 = F.kl_div(torch.log_softmax(up[:1] / t, dim=1), p[:1], reduction="none").sum(1).mean() * t * t
    assert torch.allclose(kd_loss(z_s, p, temperature=t, pixel_weight=w), ref0, atol=1e-6)


def test_teachers_are_averaged_each_with_its_own_normalisation(teachers):
    models, classes = load_teachers(teachers)
    assert classes.names == CITYSCAPES19.names and not any(p.requires_grad for m in models for p in m.parameters())
    assert models[1].normalization.bgr and not models[0].normalization.bgr
    x = torch.rand(2, 3, 32, 64)
    probs = average_teacher_probs(models, x, temperature=2.0)
    ref = sum(torch.softmax(F.interpolate(m(x), size=(32, 64), mode="bilinear", align_corners=False) / 2.0, 1)
              for m in models) / 2
    assert probs.shape == (2, 19, 32, 64) and torch.allclose(probs, ref, atol=1e-6)
    assert torch.allclose(probs.sum(1), torch.ones(2, 32, 64), atol=1e-5)
    seven = build_model("tiny", num_classes=7, width=4).eval()
    with pytest.raises(ValueError, match="different numbers of classes"):
        teacher_logits([models[0], seven], x)


def test_distillation_task_trains_only_the_student(teachers):
    models, classes = load_teachers(teachers)
    student = build_student("tiny", classes=classes, options={"width": 4})
    task = DistillationTask(student, models, temperature=2.0, ce_weight=1.0)
    assert list(task.trainable_modules()) == ["student"] and task.export_model() is student
    out = task.training_step({"image": torch.randint(0, 255, (2, 3, 32, 64), dtype=torch.uint8)}, 0)
    out.loss.backward()
    assert torch.isfinite(out.loss) and {"loss_kd", "loss_ce", "agreement"} <= set(out.logs)
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None for m in models for p in m.parameters())


def test_distill_cli_trains_a_student_from_two_teachers(tmp_path, teachers, capsys):
    assert COMMANDS["distill"].run is not None
    out = tmp_path / "run"
    rc = main(["distill", "--teachers", f"{teachers[0]},{teachers[1]}", "--model", "tiny", "--target",
               "synthetic:target:train", "--iters", "3", "--out", str(out), "--val", "synthetic:target:val",
               "model_options={width: 4}", "ce_weight=0.5", *COMMON])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    assert captured.out.strip().splitlines()[-1] == str(out / "model.ckpt")
    model, info = load_model(out / "model.ckpt")
    assert info.name == "tiny" and info.build_args["width"] == 4 and info.classes.names == CITYSCAPES19.names
    assert info.meta["distilled_from"] == [str(t) for t in teachers]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if "loss_kd" in r]) == 3
    assert json.loads((out / "eval.json").read_text())["num_images"] == 8
    assert "sfdaseg distill" in (out / "config.yaml").read_text()


def test_distill_student_from_a_checkpoint_takes_its_architecture(tmp_path, teachers, capsys):
    small = _save(tmp_path / "small.ckpt", 4, seed=3)
    out = tmp_path / "run"
    rc = main(["distill", "--teachers", str(teachers[0]), "--student-checkpoint", str(small), "--iters", "1",
               "--out", str(out), *COMMON])
    assert rc == 0, capsys.readouterr().err[-2000:]
    assert load_model(out / "model.ckpt")[1].build_args["width"] == 4


def test_mismatched_teachers_are_refused_naming_both_files(tmp_path, teachers, capsys):
    seven = _save(tmp_path / "seven_classes.ckpt", 4, classes=ClassSpec(names=tuple(f"c{i}" for i in range(7))))
    out = tmp_path / "run"
    rc = main(["distill", "--teachers", f"{teachers[0]},{seven}", "--model", "tiny", "--iters", "1",
               "--out", str(out), *COMMON])
    err = capsys.readouterr().err
    assert rc == 2
    assert str(teachers[0]) in err and str(seven) in err and "19 classes" in err and "7 classes" in err
    assert not out.exists()  # a refused run leaves no folder behind
    with pytest.raises(CheckpointError, match="seven_classes.ckpt"):
        build_student(None, classes=CITYSCAPES19, checkpoint=seven)


def test_distill_config_errors(tmp_path, teachers, capsys):
    assert main(["distill", "--model", "tiny", "--out", str(tmp_path / "x")]) == 2
    assert "teachers: required" in capsys.readouterr().err
    assert main(["distill", "--teachers", str(teachers[0]), "--out", str(tmp_path / "x")]) == 2
    assert "model: required" in capsys.readouterr().err
    assert main(["distill", "--teachers", "nope.ckpt", "--model", "tiny", "--out", str(tmp_path / "x")]) == 2
    assert "teachers[0]: no such file: nope.ckpt" in capsys.readouterr().err


def test_weighted_average_of_teachers():
    from sfdaseg.distill import average_probs

    torch.manual_seed(0)
    z = [torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5)]
    p = [torch.softmax(t, 1) for t in z]
    assert torch.allclose(average_probs(z, weights=[1.0, 1.0]), (p[0] + p[1]) / 2, atol=1e-6)
    w = torch.zeros(2, 3, 5)
    w[0] = 1.0  # image 0: only the second teacher counts; image 1: no weight at all -> the plain mean
    out = average_probs(z, weights=[torch.zeros(2, 3, 5), w])
    assert torch.allclose(out[0], p[1][0], atol=1e-6) and torch.allclose(out[1], (p[0][1] + p[1][1]) / 2, atol=1e-6)
