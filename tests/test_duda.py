"""The ``duda`` recipe: a small student is delivered, the KD weight ramps, the inconsistency weights favour the
classes the small student gets wrong, extra teachers are checked."""

import json

import numpy as np
import pytest
import torch

from sfdaseg.config import AdaptConfig, ConfigError, load_config
from sfdaseg.data.classes import CITYSCAPES19, ClassSpec
from sfdaseg.distill import ramp
from sfdaseg.models import load_model, save_model
from sfdaseg.storage import CheckpointError
from sfdaseg.methods import RECIPES
from sfdaseg.methods.duda import inconsistency_class_weights
from sfdaseg.models import build_model
from sfdaseg.runs.adapt import run_adapt

SIZE = "data.synthetic={size: [32, 64], length: 8}"


def _save(path, width, *, seed=0, classes=CITYSCAPES19):
    torch.manual_seed(seed)
    save_model(path, build_model("tiny", num_classes=classes.num_classes, width=width), classes=classes)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("duda_ckpts")
    return {"large": _save(root / "large.ckpt", 8), "small": _save(root / "small.ckpt", 4, seed=1),
            "other": _save(root / "other.ckpt", 8, seed=2)}


def duda_cfg(tmp_path, ckpts, name, *extra):
    return load_config(AdaptConfig, overrides=[
        "recipe=duda", f"checkpoint={ckpts['large']}", f"train.out={tmp_path / name}", SIZE, "data.crop=[32,64]",
        "data.batch_size=2", "data.num_workers=0", "train.device=cpu", "train.progress=false",
        "train.tensorboard=false", "train.log_every=1", "monitor.every=-1", "method.student=tiny",
        "method.student_options={width: 4}", *extra])


def test_duda_runs_and_delivers_the_small_student(tmp_path, ckpts):
    path = run_adapt(duda_cfg(tmp_path, ckpts, "run", "train.iters=3", "data.val=synthetic:target:val",
                              f"method.student_checkpoint={ckpts['small']}", f"method.teachers=[{ckpts['other']}]",
                              "method.kd_ramp=0.5"))
    model, info = load_model(path)
    assert info.name == "tiny" and info.build_args["width"] == 4  # the small student, not the width-8 teacher
    assert sum(p.numel() for p in model.parameters()) < sum(
        p.numel() for p in load_model(ckpts["large"])[0].parameters()) / 2
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert len(train) == 3
    for r in train:
        for k in ("loss", "loss_large", "loss_small_ce", "loss_inconsistency", "loss_kd"):
            assert np.isfinite(r[k]) and r[k] >= 0, k
        assert 0.0 <= r["small_agreement"] <= 1.0 and len(r["pl/class_hist"]) == 19
    # 3 steps, ramp over half of them: step 0 -> 0, step 1 -> 1 / 1.5, step 2 -> kd_weight.
    assert [r["kd_weight"] for r in train] == pytest.approx([0.0, 2 / 3, 1.0])
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["num_images"] == 8
    # The small student moved away from its source initialisation.
    start = load_model(ckpts["small"])[0].state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in model.state_dict().items() if v.is_floating_point())
    # The large EMA teacher is saved beside it (a later distill or evaluate can use it).
    large, large_info = load_model(tmp_path / "run" / "large_teacher.ckpt")
    assert large_info.build_args["width"] == 8 and large_info.meta["exported"] == "large_teacher"


def test_duda_can_deliver_the_large_teacher(tmp_path, ckpts):
    path = run_adapt(duda_cfg(tmp_path, ckpts, "t", "train.iters=1", "method.deliver=large_teacher"))
    assert load_model(path)[1].build_args["width"] == 8
    assert load_model(tmp_path / "t" / "small_student.ckpt")[1].build_args["width"] == 4


def test_ramp_is_zero_at_the_start_and_full_after():
    assert ramp(0, 100, 0.5) == 0.0
    assert ramp(25, 100, 0.5) == pytest.approx(0.5)
    assert ramp(50, 100, 0.5) == 1.0 and ramp(99, 100, 0.5) == 1.0
    assert ramp(0, 100, 0.0) == 1.0  # no ramp


def test_inconsistency_weights_favour_the_class_the_student_gets_wrong():
    teacher = torch.zeros(1, 4, 8, dtype=torch.long)
    teacher[..., 4:] = 1  # left half class 0, right half class 1
    teacher[0, 0, 0] = 255  # ignored: never counted
    student = teacher.clone()
    student[0, 0, 0] = 3
    student[..., 4:6] = 0  # half of class 1 predicted as class 0
    w = inconsistency_class_weights(student, teacher, num_classes=4)
    # IoU_0 = 15 / (15 + 8) , IoU_1 = 8 / 16; classes 2, 3 are not in the pseudo-labels: weight 0.
    dis = torch.tensor([1 - 15 / 23, 1 - 8 / 16])
    assert torch.allclose(w[:2], dis / dis.mean())
    assert w[1] > w[0] > 0 and w[2] == 0 and w[3] == 0
    assert torch.allclose(w[:2].mean(), torch.tensor(1.0))
    assert torch.equal(inconsistency_class_weights(teacher.clamp(max=3), teacher.clamp(max=3), num_classes=4),
                       torch.zeros(4))  # perfect agreement: no extra loss


def test_extra_teacher_with_other_classes_is_refused(tmp_path, ckpts):
    seven = ClassSpec(names=tuple(f"c{i}" for i in range(7)))
    bad = _save(tmp_path / "seven.ckpt", 8, classes=seven)
    with pytest.raises(CheckpointError, match="seven.ckpt") as e:
        run_adapt(duda_cfg(tmp_path, ckpts, "bad", "train.iters=1", f"method.teachers=[{bad}]"))
    assert "19 classes" in str(e.value) and "7" in str(e.value)


def test_duda_config_errors_name_the_key(tmp_path, ckpts):
    with pytest.raises(ConfigError, match="method.kd_ramp"):
        duda_cfg(tmp_path, ckpts, "x", "method.kd_ramp=1.5").method_config()
    with pytest.raises(ConfigError, match="method.student_checkpoint: no such file"):
        duda_cfg(tmp_path, ckpts, "x", "method.student_checkpoint=missing.ckpt").method_config()
    assert "duda" in RECIPES
    with pytest.raises(ConfigError, match="method.small_lr_mult"):
        duda_cfg(tmp_path, ckpts, "x", "method.small_lr_mult=0").method_config()


def test_small_student_learns_at_its_own_rate(tmp_path, ckpts):
    from sfdaseg.engine.trainer import build_param_groups
    from sfdaseg.methods.common import AdaptContext
    from sfdaseg.methods.duda import build

    cfg = duda_cfg(tmp_path, ckpts, "lr", "method.small_lr_mult=10", "optim.lr=1e-4", "optim.head_lr_mult=1",
                   "method.schedule_iters=10")
    model = load_model(ckpts["large"])[0]
    task = build(AdaptContext(model=model, classes=CITYSCAPES19, device=torch.device("cpu"), export="teacher"),
                 cfg.method_config())
    lrs = {g["name"].split("/")[0]: g["lr"] for g in build_param_groups(task.trainable_modules(), cfg.optim)}
    assert lrs["small"] == pytest.approx(1e-3) and lrs["student"] == pytest.approx(1e-4)


def test_duda_resume_gives_the_same_small_student(tmp_path, ckpts, interrupt_after_first_checkpoint):
    full = run_adapt(duda_cfg(tmp_path, ckpts, "full", "train.iters=4", "train.ckpt_every=2"))
    # Killed right after the step-2 checkpoint.
    interrupt_after_first_checkpoint(lambda: run_adapt(duda_cfg(tmp_path, ckpts, "cut", "train.iters=4",
                                                                "train.ckpt_every=2")))
    resumed = run_adapt(duda_cfg(tmp_path, ckpts, "cut", "train.iters=4", "train.ckpt_every=2", "train.resume=true"))
    a, b = load_model(full)[0].state_dict(), load_model(resumed)[0].state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
