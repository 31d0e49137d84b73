"""Issue 15's pieces, each at the level of its loss or statistic: pixel-weight normalisation, padding, running class
statistics over batches and ranks, the collapse-prevention terms, and the collapse guard on a forced collapse."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist

from sfdaseg.class_stats import RunningClassHistogram, RunningConfusion
from sfdaseg.config import AdaptConfig, load_config
from sfdaseg.data.classes import CITYSCAPES19
from sfdaseg.data.transforms import build_train_transform, collate
from sfdaseg.losses import seg_cross_entropy
from sfdaseg.methods import RECIPES
from sfdaseg.methods.common import AdaptContext, ignore_padding
from sfdaseg.models import build_model, load_model, save_model
from sfdaseg.pseudo_labels import confidence_ratio_weight, select_class_balanced
from sfdaseg.regularizers import class_prior_loss, source_anchor_loss
from sfdaseg.runs.adapt import run_adapt

# ------------------------------------------------------------------------------------------ pixel weights


def test_the_confidence_ratio_weight_scales_the_loss_as_in_daformer():
    """policy=ratio: a per-image constant weight must change the loss (mean of q * CE over valid pixels)."""
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8)
    conf = torch.cat([torch.full((1, 8, 8), 0.99), torch.full((1, 8, 8), 0.5)])  # image 1: nothing confident
    label = torch.randint(0, 4, (2, 8, 8))
    label_r, weight = confidence_ratio_weight(conf, label, tau=0.968)
    assert torch.equal(weight[0], torch.ones(8, 8)) and torch.equal(weight[1], torch.zeros(8, 8))
    plain = seg_cross_entropy(logits, label)
    ratio = seg_cross_entropy(logits, label_r, pixel_weight=weight, normalize="valid")
    ce = torch.nn.functional.cross_entropy(logits, label, reduction="none")
    assert torch.allclose(ratio, ce[0].sum() / ce.numel())  # image 1 teaches nothing, the mean keeps its pixels
    # The weighted mean a normalisation by sum(w) would give cancels the weight: it equals image 0's plain CE.
    assert torch.allclose(seg_cross_entropy(logits, label_r, pixel_weight=weight, normalize="weight"), ce[0].mean())
    half = seg_cross_entropy(logits, label, pixel_weight=torch.full((2, 8, 8), 0.5), normalize="valid")
    assert torch.allclose(half, 0.5 * plain)  # a constant weight scales the loss
    assert torch.allclose(seg_cross_entropy(logits, label, pixel_weight=torch.full((2, 8, 8), 0.5),
                                            normalize="weight"), plain)  # ... and cancels in a weighted mean


def test_stvm_reliability_is_a_weighted_mean_and_unisfda_certainty_scales():
    """STvM: sum(r * CE) / sum(r) (METHODS.md); UniSFDA: mean(certainty * CE), so a batch of uncertain labels
    teaches less."""
    import inspect

    from sfdaseg.methods import stvm, unisfda

    assert 'normalize="weight"' in inspect.getsource(stvm.STvM.training_step)
    src = inspect.getsource(unisfda.UniSFDA.training_step)
    assert "seg_cross_entropy(logits, label, ignore_index=self.ignore, pixel_weight=weight)" in src  # "valid"


# ------------------------------------------------------------------------------------------ padding


def test_online_pseudo_labels_never_label_crop_padding():
    tf = build_train_transform(resize=None, scale_range=(1.0, 1.0), crop=(32, 32), hflip=False, track_valid=True)
    sample = tf({"image": torch.full((3, 16, 16), 200, dtype=torch.uint8), "name": "a"})
    batch = collate([sample, sample])
    assert batch["valid"].shape == (2, 32, 32) and 0 < batch["valid"].float().mean() < 1
    label = torch.zeros(2, 32, 32, dtype=torch.long)  # a teacher's argmax labels the black padding too
    masked = ignore_padding(label, batch, 255)
    assert torch.equal(masked == 255, batch["valid"] == 0)


@pytest.mark.parametrize("recipe", ["selftrain", "stvm", "duda", "unisfda"])
def test_recipes_ignore_the_padding_in_their_step(recipe):
    """A batch with padding: the pseudo-labels trained on are 255 there (checked through the CE's target)."""
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=19, width=4)
    cfg = load_config(AdaptConfig, overrides=[f"recipe={recipe}", f"checkpoint={__file__}", "method.classmix=false",
                                              "method.photometric=false", "method.style=none",
                                              *(["method.student=tiny", "method.student_options={width: 4}",
                                                 "method.small_warmup=0"] if recipe == "duda" else [])])
    ctx = AdaptContext(model=model, classes=CITYSCAPES19, device=torch.device("cpu"), export="teacher", iters=4)
    task = RECIPES[recipe].build(ctx, cfg.method_config())
    task.wrap_trainable(lambda n, m: m)
    valid = torch.ones(2, 32, 32, dtype=torch.uint8)
    valid[:, :, 16:] = 0
    batch = {"image": torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), "valid": valid}
    if recipe == "unisfda":
        batch["pl_label"] = torch.where(valid.bool(), torch.randint(0, 19, (2, 32, 32)), 255).to(torch.uint8)
        batch["pl_conf"] = torch.full((2, 32, 32), 200, dtype=torch.uint8)
    seen = []
    import sfdaseg.losses as losses

    original = losses.seg_cross_entropy

    def spy(logits, target, **kw):
        seen.append(target.clone())
        return original(logits, target, **kw)

    mod = __import__(f"sfdaseg.methods.{recipe}", fromlist=["x"])
    mod.seg_cross_entropy = spy
    try:
        task.training_step(batch, 0)
    finally:
        mod.seg_cross_entropy = original
    assert seen and all((t[:, :, 16:] == 255).all() for t in seen)


# ------------------------------------------------------------------------------------------ running statistics


def test_running_histogram_thresholds_match_a_percentile_and_span_batches():
    torch.manual_seed(0)
    conf = torch.rand(4, 16, 16)
    label = torch.randint(0, 3, (4, 16, 16))
    hist = RunningClassHistogram(3, bins=1000, momentum=0.0)
    hist.update(conf, label)
    _, w_batch = select_class_balanced(conf, label, num_classes=3, percentile=30)
    _, w_run = hist.select(conf, label, percentile=30)
    assert abs(w_batch.mean() - w_run.mean()) < 0.01  # one batch, no memory: the batch percentile (to a bin)
    # With memory, a class absent from this batch keeps its threshold from earlier batches.
    hist = RunningClassHistogram(3, momentum=0.9)
    hist.update(conf, label)
    before = hist.thresholds(50)
    hist.update(conf[:1], torch.zeros_like(label[:1]))  # only class 0 now
    after = hist.thresholds(50)
    assert torch.isfinite(after).all() and torch.allclose(before[1:], after[1:])


def _fake_all_reduce(world: list[torch.Tensor]):
    """Stands in for dist.all_reduce: the sum over the tensors every simulated rank passed at this call."""
    calls = iter(world)

    def reduce(t, *a, **k):
        t.copy_(next(calls))

    return reduce


def test_two_ranks_give_the_same_thresholds_as_one_process_with_the_global_batch(monkeypatch):
    """The batch counts are summed over ranks before they enter the running histogram."""
    import sfdaseg.class_stats as cs

    torch.manual_seed(1)
    conf, label = torch.rand(4, 8, 8), torch.randint(0, 5, (4, 8, 8))
    single = RunningClassHistogram(5, momentum=0.5)
    for _ in range(2):
        single.update(conf, label)
    # Rank r holds images 2r, 2r + 1; what the all-reduce returns is the sum of both ranks' batch counts.
    per_rank = []
    for r in range(2):
        h = RunningClassHistogram(5, momentum=0.0)
        h.update(conf[2 * r:2 * r + 2], label[2 * r:2 * r + 2])
        per_rank.append(h.counts.clone())
    total = sum(per_rank)
    monkeypatch.setattr(cs.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(cs.dist, "get_world_size", lambda: 2)
    for r in range(2):
        monkeypatch.setattr(cs.dist, "all_reduce", _fake_all_reduce([total, total]))
        ranked = RunningClassHistogram(5, momentum=0.5)
        for _ in range(2):
            ranked.update(conf[2 * r:2 * r + 2], label[2 * r:2 * r + 2])
        assert torch.allclose(ranked.counts, single.counts)
        assert torch.equal(ranked.thresholds(50), single.thresholds(50))


def test_running_confusion_iou():
    conf = RunningConfusion(3, momentum=0.0)
    ref = torch.tensor([[[0, 0, 1, 1, 2, 255]]])
    pred = torch.tensor([[[0, 1, 1, 1, 0, 2]]])
    conf.update(pred, ref)
    assert torch.allclose(conf.iou(), torch.tensor([1 / 3, 2 / 3, 0.0]))


# ------------------------------------------------------------------------------------------ collapse prevention


def test_class_prior_term_is_zero_at_the_prior_and_grows_as_a_class_vanishes():
    prior = torch.tensor([0.5, 0.3, 0.2])
    at_prior = prior.view(1, 3, 1, 1).expand(2, 3, 4, 4)
    assert class_prior_loss(at_prior, prior).abs() < 1e-6
    collapsed = torch.tensor([0.9, 0.1, 0.0]).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    assert class_prior_loss(collapsed, prior) > 1.0
    uniform = torch.full((3,), 1 / 3)
    probs = torch.softmax(torch.randn(2, 3, 4, 4), 1)
    p_bar = probs.mean((0, 2, 3))
    expect = math.log(3) + (p_bar * p_bar.log()).sum()  # log C - H(p_bar): information maximisation's diversity
    assert torch.allclose(class_prior_loss(probs, uniform), expect, atol=1e-5)


def test_source_anchor_is_the_kl_to_the_source_on_image_pixels():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    src = torch.softmax(logits.detach(), 1)
    assert source_anchor_loss(logits, src).abs() < 1e-6
    other = torch.softmax(torch.randn(1, 3, 4, 4), 1)
    valid = torch.zeros(1, 4, 4, dtype=torch.bool)
    valid[..., :2] = True
    loss = source_anchor_loss(logits, other, valid=valid)
    loss.backward()
    assert loss > 0 and logits.grad[..., 2:].abs().sum() == 0  # padding takes no part


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_recipe_has_both_terms_as_switches(recipe):
    fields = {f.name for f in __import__("dataclasses").fields(RECIPES[recipe].config_cls)}
    assert {"prior_weight", "prior", "anchor_weight"} <= fields


# ------------------------------------------------------------------------------------------ the collapse guard


@pytest.fixture(scope="module")
def trained_source(tmp_path_factory):
    """A tiny source model that predicts several classes (a briefly trained one)."""
    from sfdaseg.config import TrainSourceConfig
    from sfdaseg.runs.train_source import run_train_source

    out = tmp_path_factory.mktemp("src")
    cfg = load_config(TrainSourceConfig, overrides=[
        "model.options={width: 8}", "data.crop=[32,64]", "data.batch_size=4", "data.num_workers=0",
        "data.synthetic={size: [32, 64], length: 16}", "train.iters=60", "optim.lr=1e-2", "optim.head_lr_mult=1",
        f"train.out={out / 'run'}", "train.progress=false", "train.tensorboard=false", "train.device=cpu",
        "data.check_labels=false", "data.val=null"])
    return run_train_source(cfg)


def _collapsing(tmp_path, source, name, *extra):
    # SGD at a huge LR on every pseudo-label (no style swap or ClassMix to slow it) and no pull towards the source
    # weights (adapt's default decay_to=init would reset them at this LR): the predictions collapse within a few
    # steps (a forced collapse), and the alarm fires before the last of the 16.
    return load_config(AdaptConfig, overrides=[
        "recipe=selftrain", f"checkpoint={source}", f"train.out={tmp_path / name}", "train.iters=16",
        "data.synthetic={size: [32, 64], length: 16}", "data.crop=[32,64]", "data.batch_size=4",
        "data.num_workers=0", "train.device=cpu", "train.progress=false", "train.tensorboard=false",
        "optim.name=sgd", "optim.lr=1.0", "optim.head_lr_mult=1", "optim.decay_to=zero", "optim.weight_decay=0",
        "monitor.every=2", "monitor.images=8", "method.classmix=false", "method.style=none", "method.policy=none",
        "report=false", *extra])


def test_adapt_pulls_the_weights_towards_the_source_model(tmp_path, trained_source):
    """The same high-rate run with and without optim.decay_to=init: only the pull keeps every weight near its source
    value (within ~1/weight_decay; adapt's own default strength, 200, would hold it within 0.005)."""
    def max_drift(name, *extra):
        run_adapt(_collapsing(tmp_path, trained_source, name, "optim.name=adamw", "optim.lr=0.02", "train.iters=12",
                              "monitor.every=-1", *extra))
        student = torch.load(tmp_path / name / "state.pt", weights_only=True)["modules"]["student"]
        source = load_model(trained_source)[0].state_dict()
        return max(float((student[k] - source[k]).abs().max()) for k in source
                   if source[k].is_floating_point() and "running" not in k)

    free = max_drift("free")
    pulled = max_drift("pulled", "optim.decay_to=init", "optim.weight_decay=25")
    assert pulled <= 1 / 25 + 1e-6 < free


def test_the_guard_delivers_the_last_healthy_snapshot_of_a_collapsed_run(tmp_path, trained_source):
    path = run_adapt(_collapsing(tmp_path, trained_source, "rb"))
    guard = json.loads((tmp_path / "rb" / "metrics.json").read_text())["guard"]
    assert guard["on_collapse"] == "rollback" and guard["alarms"] and guard["alarms"][-1]["step"] == 16
    assert guard["rolled_back"] and 0 < guard["delivered_step"] == guard["healthy_step"] < 16
    delivered, info = load_model(path)
    healthy, _ = load_model(tmp_path / "rb" / "guard" / "healthy.ckpt")
    assert all(torch.equal(a, b) for a, b in zip(delivered.state_dict().values(), healthy.state_dict().values()))
    assert info.meta["rolled_back"] and info.meta["delivered_step"] == guard["delivered_step"]
    # warn: the same collapse goes on and the collapsed final model is delivered, with the alarm on record.
    run_adapt(_collapsing(tmp_path, trained_source, "warn", "monitor.on_collapse=warn"))
    guard = json.loads((tmp_path / "warn" / "metrics.json").read_text())["guard"]
    assert guard["alarms"] and not guard["rolled_back"] and guard["delivered_step"] == 16
    # rollback_to=source: the same collapse delivers the source model itself (step 0), weight for weight.
    path = run_adapt(_collapsing(tmp_path, trained_source, "src", "monitor.rollback_to=source"))
    guard = json.loads((tmp_path / "src" / "metrics.json").read_text())["guard"]
    assert guard["rolled_back"] and guard["delivered_step"] == guard["healthy_step"] == 0
    assert guard["rollback_to"] == "source" and guard["alarms"][-1]["step"] == 16
    delivered, source = load_model(path)[0].state_dict(), load_model(trained_source)[0].state_dict()
    assert delivered.keys() == source.keys() and all(torch.equal(delivered[k], source[k]) for k in source)
    # stop: the run ends at the first alarm.
    run_adapt(_collapsing(tmp_path, trained_source, "stop", "monitor.on_collapse=stop"))
    guard = json.loads((tmp_path / "stop" / "metrics.json").read_text())["guard"]
    first = guard["alarms"][0]["step"]
    assert guard["stopped_at"] == first < 16 and guard["rolled_back"]
    steps = [json.loads(x)["step"] for x in (tmp_path / "stop" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == first


def test_the_guard_survives_a_resume(tmp_path, trained_source, interrupt_after_first_checkpoint):
    full = run_adapt(_collapsing(tmp_path, trained_source, "full", "train.ckpt_every=4"))
    interrupt_after_first_checkpoint(lambda: run_adapt(_collapsing(tmp_path, trained_source, "cut",
                                                                   "train.ckpt_every=4")))
    resumed = run_adapt(_collapsing(tmp_path, trained_source, "cut", "train.ckpt_every=4", "train.resume=true"))
    a = json.loads((tmp_path / "full" / "metrics.json").read_text())["guard"]
    b = json.loads((tmp_path / "cut" / "metrics.json").read_text())["guard"]
    assert (a["delivered_step"], a["rolled_back"], a["measured"]) == (b["delivered_step"], b["rolled_back"],
                                                                      b["measured"])
    x, y = load_model(full)[0].state_dict(), load_model(resumed)[0].state_dict()
    assert all(torch.equal(x[k], y[k]) for k in x)
