"""MC-dropout uncertainty: one backbone pass, T sampled classifier passes, statistics and their bounds."""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sfdaseg.models import build_model
from sfdaseg.uncertainty import head_logit_samples, max_entropy, mc_dropout, mc_dropout_features

ROOT = Path(__file__).resolve().parents[1]
C = 5


def make_model(dropout: float = 0.3, *, sharp: bool = True, seed: int = 0) -> nn.Module:
    """A small tiny model in eval mode; ``sharp`` gives the classifier large weights (confident, varied logits)."""
    torch.manual_seed(seed)
    model = build_model("tiny", num_classes=C, width=8, dropout=dropout).eval()
    if sharp:
        with torch.no_grad():
            model.classifier[1].weight.normal_(0.0, 1.0)
            model.classifier[1].bias.normal_(0.0, 0.5)
    return model


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


# -- shapes and bounds ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("out_size", [None, (32, 48)])
def test_shapes_and_bounds(x, out_size):
    model = make_model()
    r = mc_dropout(model, x, passes=6, generator=gen(), out_size=out_size)
    h, w = out_size or (8, 12)  # tiny: output stride 4
    assert r.passes == 6
    assert r.mean_prob.shape == (2, C, h, w) and r.mean_prob.dtype == torch.float32
    for t in (r.entropy, r.variance, r.label_variance, r.mutual_information, r.confidence):
        assert t.shape == (2, h, w) and torch.isfinite(t).all()
    assert r.label.shape == (2, h, w) and r.label.dtype == torch.long
    torch.testing.assert_close(r.mean_prob.sum(1), torch.ones(2, h, w))
    assert r.entropy.min() >= 0 and r.entropy.max() <= max_entropy(C) + 1e-5
    assert r.variance.min() >= 0 and r.variance.max() <= 0.25
    assert r.label_variance.min() >= 0 and r.label_variance.max() <= 0.25
    assert r.mutual_information.min() >= 0 and (r.mutual_information <= r.entropy + 1e-5).all()
    # the sampled head really varies: some pixels are uncertain across passes
    assert r.variance.max() > 1e-4 and r.mutual_information.max() > 1e-4


def test_statistics_match_a_direct_computation_from_the_samples(x):
    model = make_model()
    with torch.no_grad():
        features = model.extract(x)
    t = 7
    samples = head_logit_samples(model, features, passes=t, generator=gen(3))  # (B, T, C, h, w)
    up = F.interpolate(samples.flatten(0, 1), size=(16, 24), mode="bilinear", align_corners=False)
    prob = up.softmax(1).reshape(2, t, C, 16, 24)
    mean = prob.mean(1)
    entropy = -(mean * mean.log()).sum(1)
    expected_entropy = -(prob * prob.log()).sum(2).mean(1)
    class_var = prob.var(1, unbiased=False)
    # small chunks (one pass at a time): same masks, same result
    r = mc_dropout_features(model, features, passes=t, generator=gen(3), out_size=(16, 24),
                            chunk_elements=2 * C * 16 * 24)
    torch.testing.assert_close(r.mean_prob, mean)
    torch.testing.assert_close(r.entropy, entropy)
    torch.testing.assert_close(r.variance, class_var.mean(1))
    torch.testing.assert_close(r.label_variance, class_var.gather(1, mean.argmax(1, keepdim=True)).squeeze(1))
    torch.testing.assert_close(r.mutual_information, (entropy - expected_entropy).clamp_min(0), atol=1e-5, rtol=0)


# -- dropout semantics ----------------------------------------------------------------------------------------


def test_masked_weights_equal_dropout2d_then_the_classifier(x):
    """The vectorised passes are exactly Dropout2d (whole channels, 1/(1-p) scaling) followed by the 1x1 conv."""
    model = make_model(dropout=0.4)
    with torch.no_grad():
        features = model.extract(x)
        samples = head_logit_samples(model, features, passes=5, generator=gen(7))
        keep = (torch.rand(2, 5, features.shape[1], generator=gen(7)) >= 0.4).float() / 0.6  # the same draws
        for t in range(5):
            expected = model.classifier[1](features * keep[:, t, :, None, None])
            torch.testing.assert_close(samples[:, t], expected)
    # dropped channels are whole channels: each pass zeroes about p of them
    frac_dropped = (keep == 0).float().mean()
    assert 0.2 < frac_dropped < 0.6


def test_mean_over_many_passes_approaches_the_eval_prediction(x):
    model = make_model(dropout=0.5)
    with torch.no_grad():
        features = model.extract(x)
        eval_logits = model.classify(features)  # eval mode: dropout off
    t = 4000
    samples = head_logit_samples(model, features, passes=t, generator=gen(1))
    mean, std = samples.mean(1), samples.std(1)
    # unbiased thanks to the 1/(1-p) scaling: within 5 standard errors everywhere
    assert ((mean - eval_logits).abs() <= 5 * std / math.sqrt(t) + 1e-5).all()
    # probabilities: with the default small classifier weights the softmax is near-linear, so the mean
    # probability approaches the eval-mode softmax too
    small = make_model(dropout=0.5, sharp=False)
    r = mc_dropout(small, x, passes=2000, generator=gen(2))
    torch.testing.assert_close(r.mean_prob, small(x).softmax(1), atol=2e-4, rtol=0)


def test_one_pass_is_one_dropout_sample(x):
    model = make_model()
    r = mc_dropout(model, x, passes=1, generator=gen(5))
    with torch.no_grad():
        one = head_logit_samples(model, model.extract(x), passes=1, generator=gen(5))[:, 0].softmax(1)
    torch.testing.assert_close(r.mean_prob, one)
    assert (r.variance == 0).all() and (r.label_variance == 0).all()
    assert r.mutual_information.abs().max() <= 1e-6


@pytest.mark.parametrize("passes", [1, 4])
def test_negligible_dropout_gives_the_eval_prediction(x, passes):
    """p -> 0 (nothing is ever dropped): every pass is the deterministic eval-mode classifier."""
    model = make_model(dropout=1e-9)
    r = mc_dropout(model, x, passes=passes, generator=gen())
    with torch.no_grad():
        expected = model(x).softmax(1)
    torch.testing.assert_close(r.mean_prob, expected)
    assert r.variance.abs().max() < 1e-10 and r.mutual_information.abs().max() < 1e-5


# -- the backbone runs once; modes are left alone ---------------------------------------------------------


@pytest.mark.parametrize("strategy", ["auto", "module"])
def test_backbone_runs_once(x, strategy):
    model = make_model()
    calls = {"backbone": 0, "classifier": 0}
    model.backbone.register_forward_hook(lambda *a: calls.__setitem__("backbone", calls["backbone"] + 1))
    model.classifier.register_forward_hook(lambda *a: calls.__setitem__("classifier", calls["classifier"] + 1))
    mc_dropout(model, x, passes=16, generator=gen(), strategy=strategy,
               chunk_elements=2 * 16 * 8 * 12 * 4)  # generic path: 4 passes per chunk
    assert calls["backbone"] == 1
    # the fast path never calls the classifier module; the generic path calls it once per chunk of passes
    assert calls["classifier"] == (0 if strategy == "auto" else 4)


@pytest.mark.parametrize("strategy", ["auto", "module"])
@pytest.mark.parametrize("train", [False, True])
def test_modes_are_restored(x, strategy, train):
    model = make_model()
    model.train(train)
    before = modes(model)
    seen = []
    model.classifier[0].register_forward_pre_hook(lambda m, inp: seen.append(m.training))
    r = mc_dropout(model, x, passes=4, generator=gen(), strategy=strategy)
    assert modes(model) == before
    assert r.variance.max() > 0  # dropout was active although the model may be in eval mode
    if strategy == "module":
        assert seen and all(seen)  # the classifier's Dropout2d ran in train mode


def test_deterministic_with_a_generator_and_independent_of_chunking(x):
    model = make_model()
    a = mc_dropout(model, x, passes=8, generator=gen(11))
    b = mc_dropout(model, x, passes=8, generator=gen(11), chunk_elements=1)  # one pass per chunk
    c = mc_dropout(model, x, passes=8, generator=gen(12))
    for f in ("mean_prob", "entropy", "variance", "mutual_information"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f))
    assert not torch.allclose(a.mean_prob, c.mean_prob)
    m1 = mc_dropout(model, x, passes=8, generator=gen(11), strategy="module")
    m2 = mc_dropout(model, x, passes=8, generator=gen(11), strategy="module")
    torch.testing.assert_close(m1.mean_prob, m2.mean_prob)
    # the generic path leaves the global RNG as it was
    state = torch.get_rng_state()
    mc_dropout(model, x, passes=2, generator=gen(11), strategy="module")
    assert torch.equal(torch.get_rng_state(), state)


def test_a_non_standard_classifier_takes_the_generic_path(x):
    model = make_model()
    model.classifier = nn.Sequential(nn.Dropout2d(0.3), nn.Conv2d(16, C, 3, padding=1)).eval()  # a 3x3 head
    r = mc_dropout(model, x, passes=6, generator=gen())
    assert r.mean_prob.shape == (2, C, 8, 12) and r.variance.max() > 0
    assert not model.classifier.training
    with pytest.raises(TypeError, match="standard classifier"):
        mc_dropout(model, x, passes=2, strategy="weights")


def test_both_strategies_estimate_the_same_distribution(x):
    model = make_model(sharp=False)
    a = mc_dropout(model, x, passes=1500, generator=gen(1))
    b = mc_dropout(model, x, passes=1500, generator=gen(2), strategy="module")
    torch.testing.assert_close(a.mean_prob, b.mean_prob, atol=3e-4, rtol=0)


# -- errors ---------------------------------------------------------------------------------------------------


def test_a_model_without_classifier_dropout_is_refused(x):
    model = build_model("tiny", num_classes=C, width=8, dropout=0.0).eval()
    with pytest.raises(ValueError, match=r"model 'tiny' has no dropout.*Dropout2d\(p\).*p > 0.*dropout=0.1"):
        mc_dropout(model, x, passes=4)


def test_bad_arguments(x):
    model = make_model()
    with pytest.raises(ValueError, match="passes must be a positive integer"):
        mc_dropout(model, x, passes=0)
    with pytest.raises(ValueError, match="strategy"):
        mc_dropout(model, x, passes=2, strategy="loop")
    with pytest.raises(ValueError, match="out_size"):
        mc_dropout(model, x, passes=2, out_size=(0, 4))
    with pytest.raises(TypeError, match="not a segmentation model"):
        mc_dropout(nn.Conv2d(3, 3, 1), x, passes=2)


# -- the benchmark script at smoke-test size ------------------------------------------------------------------


def test_benchmark_smoke(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("mc_dropout_cost", ROOT / "benchmarks" / "mc_dropout_cost.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up while being built
    spec.loader.exec_module(bench)
    row = bench.measure("tiny", size=(64, 64), batch=1, passes=[1, 8], device=torch.device("cpu"),
                        warmup=1, repeats=2)
    assert row.forward_ms > 0
    for t in (1, 8):
        assert math.isfinite(row.ratio(t)) and row.ratio(t) > 0
    assert bench.main(["--models", "tiny", "--size", "64", "64", "--warmup", "1", "--repeats", "2",
                       "--device", "cpu", "--passes", "1,4,8,16"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Reproduce: `") and "| T=8 < 1.5x |" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("| tiny |"))
    ratios = [float(v) for v in re.findall(r"([0-9.]+)x \(", line)]
    assert len(ratios) == 4 and all(math.isfinite(v) and v > 0 for v in ratios)
