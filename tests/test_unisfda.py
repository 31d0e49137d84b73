"""UniSFDA: the online/offline fusion rule, the uncertainty-weighted ensemble, the recipe, the multi-stage pipeline."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from sfdaseg.cli import main
from sfdaseg.config import AdaptConfig, ConfigError, load_config
from sfdaseg.data.classes import CITYSCAPES19
from sfdaseg.models import load_model, save_model
from sfdaseg.methods.unisfda import (EnsembleLabeller, fuse_online_offline, percentile_certain,
                                     uncertainty_weighted_fusion)
from sfdaseg.models import build_model
from sfdaseg.offline_labels import mc_certainty
from sfdaseg.runs import pipeline as pipeline_mod
from sfdaseg.runs.adapt import run_adapt
from sfdaseg.uncertainty import mc_dropout

ROOT = Path(__file__).resolve().parents[1]
IGNORE = 255


def tiny_source(path, *, width, seed):
    torch.manual_seed(seed)
    model = build_model("tiny", num_classes=19, width=width)
    # A freshly initialised model predicts almost uniform probabilities (certainty ~0 everywhere, every pixel
    # tied); a larger classifier weight gives peaked, varied predictions, like a trained source model.
    torch.nn.init.normal_(model.classifier[1].weight, std=20.0)
    save_model(path, model, classes=CITYSCAPES19)
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return {"a": tiny_source(root / "a.ckpt", width=8, seed=0), "b": tiny_source(root / "b.ckpt", width=12, seed=1),
            "student": tiny_source(root / "s.ckpt", width=4, seed=2)}


def common(tmp_path):
    return ["data.synthetic={size: [32, 64], length: 8}", "data.crop=[32,64]", "data.batch_size=2",
            "data.num_workers=0", "data.val_batch_size=4", f"data.cache_dir={tmp_path / 'cache'}", "data.val=null",
            "data.val_extra=[]", "train.device=cpu", "train.progress=false", "train.tensorboard=false",
            "train.log_every=1", "monitor.every=-1", "report=false"]


# ------------------------------------------------------------------------------------------------ the rules


def test_fusion_takes_the_online_label_exactly_where_the_offline_one_is_uncertain():
    # One row of 11 pixels: five offline pixels of class 0, five of class 1, one without an offline label.
    off_label = torch.tensor([[[0, 0, 0, 0, 0, 1, 1, 1, 1, 1, IGNORE]]])
    off_cert = torch.tensor([[[0.9, 0.8, 0.7, 0.6, 0.1, 0.95, 0.9, 0.85, 0.2, 0.1, 1.0]]])
    on_label = torch.full_like(off_label, 2)
    on_cert = torch.ones(1, 1, 11)
    on_cert[0, 0, 9] = 0.0  # the teacher is uncertain here too
    # 60th percentile per class: the 3 most certain of the 5 pixels of each class are certain (ties kept).
    certain = percentile_certain(off_cert, off_label, num_classes=19, percentile=60.0)
    assert certain[0, 0].tolist() == [True] * 3 + [False] * 2 + [True] * 3 + [False] * 3
    fused = fuse_online_offline(off_label, off_cert, on_label, on_cert, num_classes=19, offline_percentile=60.0,
                                online_percentile=90.0)  # online: 10 of the 11 pixels certain, not pixel 9
    assert fused.label[0, 0].tolist() == [0, 0, 0, 2, 2, 1, 1, 1, 2, IGNORE, IGNORE]
    assert fused.from_online[0, 0].tolist() == [False] * 3 + [True] * 2 + [False] * 3 + [True] + [False] * 2
    expected = torch.tensor([0.9, 0.8, 0.7, 1.0, 1.0, 0.95, 0.9, 0.85, 1.0, 0.0, 0.0])
    assert torch.allclose(fused.certainty[0, 0], expected)
    # Extremes: percentile 100 keeps every offline label, 0 hands every one to the teacher.
    keep_all = fuse_online_offline(off_label, off_cert, on_label, on_cert, num_classes=19, offline_percentile=100.0,
                                   online_percentile=100.0)
    assert torch.equal(keep_all.label, off_label)
    hand_over = fuse_online_offline(off_label, off_cert, on_label, on_cert, num_classes=19, offline_percentile=0.0,
                                    online_percentile=100.0)
    assert hand_over.label[0, 0].tolist() == [2] * 10 + [IGNORE]


def test_uncertainty_weighted_fusion_favours_the_certain_model():
    p_certain = torch.tensor([0.6, 0.4]).reshape(1, 2, 1, 1)
    p_unsure = torch.tensor([0.2, 0.8]).reshape(1, 2, 1, 1)
    plain = (p_certain + p_unsure) / 2
    assert plain.argmax(1).item() == 1  # the plain average follows the unsure model
    fused = uncertainty_weighted_fusion([p_certain, p_unsure], [torch.full((1, 1, 1), 0.9), torch.full((1, 1, 1), 0.1)])
    assert torch.allclose(fused.flatten(), torch.tensor([0.56, 0.44]), atol=1e-5)  # 0.9 * p_certain + 0.1 * p_unsure
    assert torch.allclose(fused.sum(1), torch.ones(1, 1, 1))
    # Where every model is fully uncertain the weights fall back to uniform.
    both_zero = uncertainty_weighted_fusion([p_certain, p_unsure], [torch.zeros(1, 1, 1)] * 2)
    assert torch.allclose(both_zero, plain)


def test_ensemble_labeller_weights_each_model_by_its_mc_dropout_certainty():
    torch.manual_seed(0)
    models = []
    for width in (8, 12):
        m = build_model("tiny", num_classes=19, width=width)
        torch.nn.init.normal_(m.classifier[1].weight, std=20.0)
        models.append(m.eval())
    x = torch.rand(2, 3, 32, 64)
    labeller = EnsembleLabeller(models, passes=4).eval()
    fused = labeller.fused_probs(x)
    # The labeller draws each model's masks from one generator, in turn: redo that by hand.
    g = torch.Generator().manual_seed(0)
    results = [mc_dropout(m, x, passes=4, generator=g, out_size=(32, 64)) for m in models]
    certs = [mc_certainty(r) for r in results]
    manual = uncertainty_weighted_fusion([r.mean_prob for r in results], certs)
    assert torch.allclose(fused, manual, atol=1e-6)
    assert torch.allclose(labeller(x).exp(), fused, atol=1e-5)  # forward: log-probabilities
    # Per pixel, the fused prediction lies closer to the more certain model's.
    dist = [(fused - r.mean_prob).abs().sum(1) for r in results]
    a_more = certs[0] > certs[1] + 1e-3
    b_more = certs[1] > certs[0] + 1e-3
    assert a_more.any() and b_more.any()
    assert (dist[0] < dist[1])[a_more].all() and (dist[1] < dist[0])[b_more].all()
    uniform = EnsembleLabeller(models, passes=4, weighting="uniform").fused_probs(x)
    assert torch.allclose(uniform, (results[0].mean_prob + results[1].mean_prob) / 2, atol=1e-6)


# ------------------------------------------------------------------------------------------------ one model


def test_recipe_runs_and_caches_the_mc_dropout_certainty(tmp_path, sources):
    cfg = load_config(AdaptConfig, overrides=["recipe=unisfda", f"checkpoint={sources['a']}",
                                              f"train.out={tmp_path / 'run'}", "train.iters=3", "method.mc_passes=4",
                                              "method.style_p=1.0", *common(tmp_path)])
    path = run_adapt(cfg)
    assert load_model(path)[1].name == "tiny"
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert len(train) == 3 and all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in train)
    last = train[-1]
    assert 0.0 < last["pl/online_frac"] < 1.0 and 0.5 < last["pl/offline_frac"] < 1.0  # both sources are used
    assert 0.0 < last["pl/mean_conf"] <= 1.0
    manifests = list((tmp_path / "cache").rglob("manifest.json"))
    assert len(manifests) == 1
    info = json.loads(manifests[0].read_text())["info"]
    assert info["conf"] == {"uncertainty": "mc_dropout", "mc_passes": 4, "measure": "entropy"}
    conf = np.array(Image.open(next(manifests[0].parent.glob("*.conf.png"))))
    assert conf.min() < conf.max()  # a certainty map, not a constant
    # The MC-dropout settings key the cache: other passes, another folder (and the first one is left alone).
    run_adapt(load_config(AdaptConfig, overrides=["recipe=unisfda", f"checkpoint={sources['a']}",
                                                  f"train.out={tmp_path / 'run2'}", "train.iters=1",
                                                  "method.mc_passes=2", *common(tmp_path)]))
    assert len(list((tmp_path / "cache").rglob("manifest.json"))) == 2


def test_recipe_resumes_exactly(tmp_path, sources, interrupt_after_first_checkpoint):
    """MC-dropout masks and style donors come from the trainer's per-step seed: a resumed run is the same run."""
    def cfg(name, *extra):
        return load_config(AdaptConfig, overrides=["recipe=unisfda", f"checkpoint={sources['a']}",
                                                   f"train.out={tmp_path / name}", "train.iters=4",
                                                   "train.ckpt_every=2", "method.mc_passes=2",
                                                   "method.online_mc_passes=2", *common(tmp_path), *extra])

    full = run_adapt(cfg("full"))
    interrupt_after_first_checkpoint(lambda: run_adapt(cfg("cut")))  # killed right after the step-2 checkpoint
    resumed = run_adapt(cfg("cut", "train.resume=true"))
    a, b = load_model(full)[0].state_dict(), load_model(resumed)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_recipe_distils_the_online_soft_ensemble_when_asked(tmp_path, sources):
    cfg = load_config(AdaptConfig, overrides=["recipe=unisfda", f"checkpoint={sources['student']}",
                                              f"train.out={tmp_path / 'kd'}", "train.iters=2", "method.mc_passes=2",
                                              "method.online_mc_passes=2", "method.kd_weight=0.5",
                                              f"method.kd_teachers=[{sources['a']}, {sources['b']}]",
                                              "method.classmix=true", *common(tmp_path)])
    run_adapt(cfg)
    records = [json.loads(x) for x in (tmp_path / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss_kd"]) and r["loss_kd"] >= 0 for r in records if "loss" in r)
    with pytest.raises(ConfigError, match="kd_teachers"):
        load_config(AdaptConfig, overrides=["recipe=unisfda", f"checkpoint={sources['a']}",
                                            "method.kd_weight=0.5"]).method_config()


# ------------------------------------------------------------------------------------------------ the pipeline


def pipeline_overrides(tmp_path, sources, out):
    aux = (f"stages.aux=[{{name: wide, checkpoint: {sources['a']}}}, "
           f"{{name: wider, checkpoint: {sources['b']}, overrides: [train.iters=3]}}]")
    return [f"checkpoint={sources['student']}", f"train.out={out}", "train.iters=2", aux,
            "stages.student.overrides=[train.iters=2, method.style=adain, method.kd_weight=0.5]",
            "stages.ensemble.mc_passes=4", "method.mc_passes=4",
            "method.online_mc_passes=2", *common(tmp_path)]


def test_pipeline_runs_every_stage_from_the_cli(tmp_path, sources, capsys):
    out = tmp_path / "uni"
    code = main(["adapt", "--config", str(ROOT / "configs/adapt/unisfda_pipeline_synthetic.yaml"),
                 *pipeline_overrides(tmp_path, sources, out)])
    assert code == 0
    final = out / "stage2" / "model.ckpt"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(final)  # the final checkpoint, printed last
    model, _ = load_model(final)
    assert model.build_args["width"] == 4  # the efficient model, not an auxiliary one
    for name, iters in (("wide", 2), ("wider", 3)):
        records = [json.loads(x) for x in (out / f"stage1_{name}" / "metrics.jsonl").read_text().splitlines()]
        assert max(r["step"] for r in records) == iters  # each stage's own overrides
    manifest = json.loads((out / "ensemble" / "manifest.json").read_text())
    assert [m["name"] for m in manifest["models"]] == ["wide", "wider"]
    assert len({m["fingerprint"] for m in manifest["models"]}) == 2
    cache = Path(manifest["cache"])
    assert cache.parent == out / "ensemble" / "cache" and cache.name == manifest["fingerprint"][:16]
    assert len(list(cache.glob("*.png"))) == 16  # 8 images x (label, certainty)
    stage2 = yaml.safe_load((out / "stage2" / "config.yaml").read_text())
    assert stage2["method"]["offline_cache"] == str(cache)  # stage 2 learns from the ensemble's labels
    assert stage2["method"]["style"] == "adain"  # the student's own override
    # kd_weight > 0: the pipeline hands the adapted auxiliary models to stage 2 for the soft-ensemble KL.
    assert stage2["method"]["kd_teachers"] == [str(out / "stage1_wide" / "model.ckpt"),
                                               str(out / "stage1_wider" / "model.ckpt")]
    assert all("loss_kd" in json.loads(x) for x in (out / "stage2" / "metrics.jsonl").read_text().splitlines())
    assert yaml.safe_load((out / "stage1_wide" / "config.yaml").read_text())["method"]["style"] == "fourier"


def test_pipeline_resumes_after_stage_one_without_retraining_it(tmp_path, sources, monkeypatch):
    out = tmp_path / "uni"
    cfg = load_config(AdaptConfig, overrides=["recipe=unisfda", *pipeline_overrides(tmp_path, sources, out)])

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies once stage 1 is over

    monkeypatch.setattr(pipeline_mod, "_ensemble_stage", killed)
    with pytest.raises(KeyboardInterrupt):
        pipeline_mod.run_pipeline(cfg)
    monkeypatch.undo()
    stage1 = [out / "stage1_wide" / "model.ckpt", out / "stage1_wider" / "model.ckpt"]
    stamps = {p: p.stat().st_mtime_ns for p in stage1}
    assert not (out / "ensemble").exists() and not (out / "stage2").exists()

    with pytest.raises(ConfigError, match="resume"):  # like any run: an existing OUT needs resume=true
        pipeline_mod.run_pipeline(cfg)

    runs = []
    original = pipeline_mod.run_adapt
    monkeypatch.setattr(pipeline_mod, "run_adapt", lambda c: runs.append(c.train.out) or original(c))
    resume = load_config(AdaptConfig, overrides=["recipe=unisfda", *pipeline_overrides(tmp_path, sources, out),
                                                 "train.resume=true"])
    final = pipeline_mod.run_pipeline(resume)
    assert final == out / "stage2" / "model.ckpt" and final.is_file()
    assert runs == [str(out / "stage2")]  # only stage 2 trained: stage 1 reused
    assert {p: p.stat().st_mtime_ns for p in stage1} == stamps

    # Everything finished: a third call reuses every stage, the ensemble cache included.
    cache_files = sorted((out / "ensemble" / "cache").rglob("*.png"))
    cache_stamps = [p.stat().st_mtime_ns for p in cache_files]
    final_stamp = final.stat().st_mtime_ns
    runs.clear()
    assert pipeline_mod.run_pipeline(resume) == final
    assert runs == [] and final.stat().st_mtime_ns == final_stamp
    assert [p.stat().st_mtime_ns for p in cache_files] == cache_stamps

    # A stage folder is never reused with other settings.
    changed = load_config(AdaptConfig, overrides=["recipe=unisfda", *pipeline_overrides(tmp_path, sources, out),
                                                  "train.resume=true", "optim.lr=1e-3"])
    with pytest.raises(ConfigError, match=r"stage1_wide.*optim"):
        pipeline_mod.run_pipeline(changed)


@pytest.mark.parametrize("override, message", [
    ("recipe=selftrain", "recipe unisfda"),
    ("stages.aux=[{name: a, checkpoint: x.ckpt}, {name: a, checkpoint: y.ckpt}]", "used twice"),
    ("stages.aux=[{name: 'a/b', checkpoint: x.ckpt}]", "folder name"),
    ("stages.aux=[{name: a, checkpoint: x.ckpt, overrides: [train.out=elsewhere]}]", "pipeline sets"),
    ("stages.aux=[{name: a, checkpoint: x.ckpt, colour: red}]", "unknown key 'stages.aux\\[0\\].colour'"),
    ("stages.ensemble.weighting=median", "weighting"),
])
def test_bad_stages_are_refused_naming_the_key(tmp_path, sources, override, message):
    base = ["recipe=unisfda", f"checkpoint={sources['student']}", "stages.aux=[{name: a, checkpoint: x.ckpt}]"]
    with pytest.raises(ConfigError, match=message):
        load_config(AdaptConfig, overrides=[*base, override])


def test_missing_auxiliary_checkpoint_is_named_before_any_work(tmp_path, sources):
    cfg = load_config(AdaptConfig, overrides=["recipe=unisfda", f"checkpoint={sources['student']}",
                                              f"train.out={tmp_path / 'o'}",
                                              f"stages.aux=[{{name: a, checkpoint: {tmp_path / 'nope.ckpt'}}}]"])
    with pytest.raises(ConfigError, match=r"stages.aux\[0\].checkpoint: no such file"):
        pipeline_mod.run_pipeline(cfg)
    assert not (tmp_path / "o").exists()
