"""``sfdaseg adapt``: every recipe runs end to end, reads target images only, resumes exactly, reuses its cache."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sfdaseg.config import AdaptConfig, load_config
from sfdaseg.data.classes import CITYSCAPES19
from sfdaseg.models import load_model, save_model
from sfdaseg.methods import RECIPES
from sfdaseg.models import build_model
from sfdaseg.runs.adapt import run_adapt

SIZE = "data.synthetic={size: [32, 64], length: 8}"


@pytest.fixture(scope="module")
def source_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=19, width=8)
    path = tmp_path_factory.mktemp("src") / "source.ckpt"
    save_model(path, model, classes=CITYSCAPES19)
    return path


def adapt_cfg(tmp_path, source_ckpt, recipe, name, *extra):
    return load_config(AdaptConfig, overrides=[
        f"recipe={recipe}", f"checkpoint={source_ckpt}", f"train.out={tmp_path / name}", SIZE,
        "data.crop=[32,64]", "data.batch_size=2", "data.num_workers=0", "data.val_batch_size=4",
        f"data.cache_dir={tmp_path / 'cache'}", "train.device=cpu", "train.progress=false",
        "train.tensorboard=false", "train.log_every=1", "monitor.every=0", "monitor.on_collapse=warn",
        "method.proto_init_images=4" if recipe == "diga_sf" else
        "export=teacher", *extra])


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_runs_and_logs_pseudo_label_statistics(tmp_path, source_ckpt, recipe):
    path = run_adapt(adapt_cfg(tmp_path, source_ckpt, recipe, "run", "train.iters=3", "data.val=synthetic:target:val",
                               "data.val_extra=[synthetic:shift:val]"))
    model, info = load_model(path)
    assert info.classes.names == CITYSCAPES19.names
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rec = [r for r in records if "loss" in r]
    assert len(train_rec) == 3 and all(np.isfinite(r["loss"]) for r in train_rec)
    last = train_rec[-1]
    assert 0.0 <= last["pl/kept_frac"] <= 1.0 and 0.0 <= last["pl/mean_conf"] <= 1.0
    assert len(last["pl/class_hist"]) == 19 and abs(sum(last["pl/class_hist"]) - 1.0) < 1e-3 or \
        last["pl/kept_frac"] == 0.0
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["num_images"] == 8
    assert "synthetic:shift:val" in json.loads((tmp_path / "run" / "eval_extra.json").read_text())
    resolved = (tmp_path / "run" / "config.yaml").read_text()
    assert "method:" in resolved and "ema_momentum" in resolved  # recipe defaults are recorded


@pytest.mark.parametrize("recipe", ["selftrain", "diga_sf"])
def test_adapt_resume_gives_the_same_model(tmp_path, source_ckpt, recipe, monkeypatch):
    full = run_adapt(adapt_cfg(tmp_path, source_ckpt, recipe, "full", "train.iters=4", "train.ckpt_every=2"))
    from sfdaseg.engine import trainer as trainer_mod

    original = trainer_mod.Trainer.save_state
    calls = {"n": 0}

    def save_then_stop(self):
        original(self)
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt  # killed right after the step-2 checkpoint

    monkeypatch.setattr(trainer_mod.Trainer, "save_state", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_adapt(adapt_cfg(tmp_path, source_ckpt, recipe, "cut", "train.iters=4", "train.ckpt_every=2"))
    monkeypatch.setattr(trainer_mod.Trainer, "save_state", original)
    resumed = run_adapt(adapt_cfg(tmp_path, source_ckpt, recipe, "cut", "train.iters=4", "train.ckpt_every=2",
                                  "train.resume=true"))
    a, b = load_model(full)[0].state_dict(), load_model(resumed)[0].state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_student_and_teacher_exports_differ(tmp_path, source_ckpt):
    t = run_adapt(adapt_cfg(tmp_path, source_ckpt, "selftrain", "t", "train.iters=3", "export=teacher"))
    s = run_adapt(adapt_cfg(tmp_path, source_ckpt, "selftrain", "s", "train.iters=3", "export=student"))
    a, b = load_model(t)[0].state_dict(), load_model(s)[0].state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


def write_folder_target(root, n=4, *, corrupt_masks=True):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 64, 3), dtype=np.uint8)).save(root / "images" / f"im{i}.png")
        (root / "masks" / f"im{i}.png").write_bytes(b"not a png" if corrupt_masks else b"")
    (root / "classes.yaml").write_text("names: [" + ", ".join(f"'{n}'" for n in CITYSCAPES19.names) + "]\n")


@pytest.mark.parametrize("recipe", ["selftrain", "diga_sf"])
def test_target_labels_are_never_read(tmp_path, source_ckpt, recipe, monkeypatch):
    """The target folder's masks are garbage: adaptation must not open them (and must not fail)."""
    write_folder_target(tmp_path / "target")
    import sfdaseg.data.datasets as ds

    def no_labels(*a, **k):
        raise AssertionError("a target label file was read during adaptation")

    monkeypatch.setattr(ds, "decode_label", no_labels)
    path = run_adapt(adapt_cfg(tmp_path, source_ckpt, recipe, "run", "train.iters=2",
                               f"data.target=folder:{tmp_path / 'target'}"))
    assert path.exists()


def test_offline_labels_are_cached_and_reused(tmp_path, source_ckpt):
    run_adapt(adapt_cfg(tmp_path, source_ckpt, "diga_sf", "a", "train.iters=1"))
    files = sorted((tmp_path / "cache").rglob("*.png"))
    assert len(files) == 16  # 8 images x (label, confidence)
    stamps = {f: f.stat().st_mtime_ns for f in files}
    run_adapt(adapt_cfg(tmp_path, source_ckpt, "diga_sf", "b", "train.iters=1"))
    assert {f: f.stat().st_mtime_ns for f in files} == stamps  # reused, not recomputed


@pytest.mark.parametrize("recipe", ["selftrain", "stvm", "diga_sf"])
def test_strong_view_knobs_style_and_jitter(tmp_path, source_ckpt, recipe):
    path = run_adapt(adapt_cfg(tmp_path, source_ckpt, recipe, "run", "train.iters=2", "method.style=fourier",
                               "method.jitter=0.4", "method.hue=0.05", "monitor.every=-1", "report=false"))
    assert load_model(path)[0].name == "tiny"
    with pytest.raises(Exception, match="method.style"):
        adapt_cfg(tmp_path, source_ckpt, recipe, "bad", "method.style=fourrier")
