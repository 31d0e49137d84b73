"""The training loop: schedule, resume equality, gradient accumulation, non-finite losses, DDP on 2 CPU processes."""

import json
import subprocess

import numpy as np
import pytest
import torch

from sfdaseg.config import OptimConfig, TrainSourceConfig, load_config
from sfdaseg.models import load_model
from sfdaseg.engine.trainer import NonFiniteLossError, lr_factor
from sfdaseg.methods.source import SupervisedSegmentation
from sfdaseg.runs.train_source import run_train_source

SMALL = [
    "model.name=tiny", "model.options={width: 8, dropout: 0.0}",
    "data.train=synthetic:source:train", "data.val=null", "data.synthetic={size: [32, 64], length: 16}",
    "data.crop=[32,64]", "data.scale_range=[1.0,1.0]", "data.batch_size=4", "data.num_workers=0",
    "optim.lr=0.01", "train.device=cpu", "train.progress=false", "train.tensorboard=false", "train.log_every=1",
]


def small_cfg(tmp_path, name, *extra):
    return load_config(TrainSourceConfig, overrides=[*SMALL, f"train.out={tmp_path / name}", *extra])


def weights(path):
    return load_model(path)[0].state_dict()


def test_lr_schedule_warmup_and_poly():
    cfg = OptimConfig(lr=1.0, warmup_iters=10, warmup_ratio=0.0, poly_power=1.0)
    assert lr_factor(0, total=100, cfg=cfg) == 0.0
    assert lr_factor(5, total=100, cfg=cfg) == pytest.approx(0.5 * 0.95)
    assert lr_factor(50, total=100, cfg=cfg) == pytest.approx(0.5)
    assert lr_factor(100, total=100, cfg=cfg) == 0.0
    cfg = OptimConfig(lr=1.0, poly_power=0.9, min_lr=0.1)
    assert lr_factor(100, total=100, cfg=cfg) == pytest.approx(0.1)


def test_head_lr_multiplier_and_no_decay(tmp_path):
    from sfdaseg.engine.trainer import build_param_groups
    from sfdaseg.models import build_model

    model = build_model("tiny", num_classes=5, width=8)
    groups = build_param_groups({"model": model}, OptimConfig(lr=0.1, head_lr_mult=10.0, weight_decay=0.01))
    by_name = {g["name"]: g for g in groups}
    assert by_name["model/head"]["lr"] == pytest.approx(1.0)
    assert by_name["model/backbone"]["lr"] == pytest.approx(0.1)
    assert all(g["weight_decay"] == 0.0 for n, g in by_name.items() if n.endswith("no_decay"))
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(model.parameters()))


def test_decay_to_init_groups_and_from_scratch_modules():
    from sfdaseg.engine.trainer import build_param_groups
    from sfdaseg.models import build_model

    model, new = build_model("tiny", num_classes=5, width=8), torch.nn.Conv2d(4, 4, 1)
    new.from_scratch = True
    groups = build_param_groups({"model": model, "new": new},
                                OptimConfig(lr=0.1, weight_decay=50.0, decay_to="init", head_lr_mult=1.0))
    by_name = {g["name"]: g for g in groups}
    # The optimizer's own (towards-zero) decay is off everywhere; every model weight, norm and bias included, is
    # pulled to its start; the new module gets no decay at all.
    assert all(g["weight_decay"] == 0.0 for g in groups)
    model_params = sum(len(g["params"]) for n, g in by_name.items() if n.startswith("model/") and g["decay_to_init"])
    assert model_params == len(list(model.parameters()))
    assert all(g["decay_to_init"] == 0.0 for n, g in by_name.items() if n.startswith("new/"))


@pytest.mark.parametrize("lr", [1e-3, 1e-2])
def test_decay_to_init_bounds_the_drift_whatever_the_lr(lr):
    """A constant gradient drives AdamW's weight ~lr per step; pulled back by lr * wd, it settles ~1/wd away."""
    from sfdaseg.engine.distributed import DistInfo
    from sfdaseg.engine.trainer import Trainer

    class Push:  # a task whose loss pushes every weight up at a constant rate
        def __init__(self):
            self.w = torch.nn.Linear(4, 4)

        def trainable_modules(self):
            return {"w": self.w}

        def frozen_modules(self):
            return {}

        def param_groups(self):
            return None

        def wrap_trainable(self, wrap):
            wrap("w", self.w)

    task = Push()
    start = [p.detach().clone() for p in task.w.parameters()]
    cfg = OptimConfig(lr=lr, weight_decay=20.0, decay_to="init", poly_power=0.0)
    from sfdaseg.config import TrainConfig

    trainer = Trainer(task, [], train_cfg=TrainConfig(iters=1), optim_cfg=cfg, batch_size=1, num_workers=0,
                      device=torch.device("cpu"), dist_info=DistInfo(), run_dir="/nonexistent",
                      save_model=lambda *a: None, checkpoints=False)
    for _ in range(2000):
        loss = -sum(p.sum() for p in task.w.parameters())
        loss.backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        trainer._decay_to_init()
    drift = max(float((p.detach() - s).abs().max()) for p, s in zip(task.w.parameters(), start))
    # Equilibrium of d <- (d + lr) (1 - lr wd), Adam's step being ~lr: d = (1 - lr wd) / wd, never above 1 / wd =
    # 0.05 whatever the LR (without the pull the weights would have moved 2000 * lr = 2 or 20).
    assert drift == pytest.approx((1 - lr * 20.0) / 20.0, rel=0.05)
    assert drift <= 1 / 20.0


@pytest.mark.parametrize("extra", [[], ["optim.decay_to=init", "optim.weight_decay=5.0"]], ids=["zero", "init"])
def test_resume_gives_the_same_weights(tmp_path, monkeypatch, extra):
    full = run_train_source(small_cfg(tmp_path, "full", "train.iters=6", "train.ckpt_every=3", *extra))

    original = SupervisedSegmentation.training_step

    def interrupted(self, batch, step):
        if step == 4:
            raise KeyboardInterrupt  # as if the job were stopped between checkpoints
        return original(self, batch, step)

    monkeypatch.setattr(SupervisedSegmentation, "training_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_train_source(small_cfg(tmp_path, "cut", "train.iters=6", "train.ckpt_every=3", *extra))
    assert (tmp_path / "cut" / "state.pt").exists() and not (tmp_path / "cut" / "model.ckpt").exists()
    monkeypatch.setattr(SupervisedSegmentation, "training_step", original)
    resumed = run_train_source(small_cfg(tmp_path, "cut", "train.iters=6", "train.ckpt_every=3", "train.resume=true",
                                         *extra))

    a, b = weights(full), weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 6


def test_existing_run_folder_is_refused(tmp_path):
    from sfdaseg.config import ConfigError

    run_train_source(small_cfg(tmp_path, "r", "train.iters=1"))
    before = (tmp_path / "r" / "model.ckpt").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run"):
        run_train_source(small_cfg(tmp_path, "r", "train.iters=1"))
    assert (tmp_path / "r" / "model.ckpt").read_bytes() == before


def test_gradient_accumulation_matches_large_batch(tmp_path):
    """2 micro-batches of 2 == 1 batch of 4 (same samples, same augmentation; no BN in this model variant).

    SGD, not Adam: Adam divides by the gradient's running RMS, which turns float rounding in near-zero gradient
    entries into visible weight differences; SGD is linear in the gradient, so a tight tolerance is meaningful.
    """
    exact = ["model.options={width: 8, dropout: 0.0, norm: gn}", "optim.name=sgd", "optim.lr=0.05"]
    big = run_train_source(small_cfg(tmp_path, "big", "train.iters=3", *exact))
    acc = run_train_source(small_cfg(tmp_path, "acc", "train.iters=3", "data.batch_size=2", "train.accumulate=2",
                                     *exact))
    a, b = weights(big), weights(acc)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    original = SupervisedSegmentation.training_step

    def nan_at_3(self, batch, step):
        out = original(self, batch, step)
        if step == 3:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(SupervisedSegmentation, "training_step", nan_at_3)
    with pytest.raises(NonFiniteLossError, match="step 3"):
        run_train_source(small_cfg(tmp_path, "nan", "train.iters=6", "train.ckpt_every=2", "train.log_every=2"))
    state = torch.load(tmp_path / "nan" / "state.pt", weights_only=True)
    assert state["step"] == 2
    assert all(torch.isfinite(v).all() for v in state["modules"]["model"].values() if v.is_floating_point())

    skipped = run_train_source(small_cfg(tmp_path, "skip", "train.iters=6", "train.on_nan=skip"))
    assert all(torch.isfinite(v).all() for v in weights(skipped).values() if v.is_floating_point())


@pytest.mark.ddp
@pytest.mark.timeout(300)
def test_ddp_two_cpu_processes_match_single_process(tmp_path, cli_env, python):
    """2 gloo ranks x batch 2 == 1 process x batch 4: ranks end identical, and equal the single run within tolerance."""
    common = [a for a in SMALL if not a.startswith("data.batch_size")] + [
        "model.options={width: 8, dropout: 0.0, norm: gn}", "optim.name=sgd", "optim.lr=0.05", "train.iters=4",
        "train.ckpt_every=2"]
    ddp = subprocess.run(
        [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sfdaseg",
         "train-source", *common, "data.batch_size=2", f"train.out={tmp_path / 'ddp'}"],
        env=cli_env, capture_output=True, text=True, timeout=280,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.strip().splitlines()[-1] == str(tmp_path / "ddp" / "model.ckpt")
    single = run_train_source(load_config(TrainSourceConfig, overrides=[*common, "data.batch_size=4",
                                                                        f"train.out={tmp_path / 'single'}"]))
    records = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    replica = [r["replica_max_abs_diff"] for r in records if "replica_max_abs_diff" in r]
    assert replica == [0.0], "the two ranks ended with different weights"
    a, b = weights(tmp_path / "ddp" / "model.ckpt"), weights(single)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("switches", [["train.amp=bf16"], ["train.amp=fp16"], ["train.channels_last=true"]])
def test_amp_and_channels_last_switches_train(tmp_path, switches):
    path = run_train_source(small_cfg(tmp_path, "amp", "train.iters=2", *switches))
    records = [json.loads(x) for x in (tmp_path / "amp" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    assert all(torch.isfinite(v).all() for v in weights(path).values() if v.is_floating_point())


def test_metrics_jsonl_has_loss_lr_and_throughput(tmp_path):
    run_train_source(small_cfg(tmp_path, "log", "train.iters=2", "train.tensorboard=true"))
    rec = json.loads((tmp_path / "log" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"step", "loss", "lr", "images_per_s", "data_wait_frac"} <= set(rec)
    assert any((tmp_path / "log" / "tb").iterdir())  # TensorBoard event file


def test_teacher_follows_the_students_memory_format(tmp_path):
    """train.channels_last: the EMA teacher's (and the frozen source's) conv weights are channels-last too."""
    from sfdaseg.config import AdaptConfig, load_config
    from sfdaseg.data.classes import CITYSCAPES19
    from sfdaseg.engine.distributed import DistInfo
    from sfdaseg.engine.trainer import Trainer
    from sfdaseg.methods import RECIPES
    from sfdaseg.methods.common import AdaptContext
    from sfdaseg.models import build_model

    torch.manual_seed(0)
    model = build_model("tiny", num_classes=19, width=4)
    cfg = load_config(AdaptConfig, overrides=[f"checkpoint={__file__}", "train.channels_last=true",
                                              f"train.out={tmp_path}", "method.anchor_weight=0.5"])
    ctx = AdaptContext(model=model, classes=CITYSCAPES19, device=torch.device("cpu"), export="teacher", iters=2)
    task = RECIPES["selftrain"].build(ctx, cfg.method_config())
    Trainer(task, [], train_cfg=cfg.train, optim_cfg=cfg.optim, batch_size=2, num_workers=0,
            device=torch.device("cpu"), dist_info=DistInfo(), run_dir=tmp_path, save_model=lambda p, m: None)
    frozen = task.frozen_modules()
    assert set(frozen) == {"teacher", "source"}
    for m in frozen.values():
        w = next(p for p in m.parameters() if p.dim() == 4)
        assert w.is_contiguous(memory_format=torch.channels_last)
