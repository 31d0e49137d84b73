"""Pseudo-label policies, prototypes, consensus and statistics on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch

from sfdaseg.pseudo_labels import (
    POLICIES,
    PrototypeMemory,
    bilateral_consensus,
    confidence_ratio_weight,
    pseudo_label_stats,
    select_class_balanced,
    select_none,
    select_pseudo_labels,
    select_threshold,
    softmax_confidence,
)

IGN = 255


def test_softmax_confidence():
    logits = torch.zeros(1, 3, 1, 2)
    logits[0, 2, 0, 0] = 10.0
    logits[0, 1, 0, 1] = math.log(2.0)  # probs (1, 2, 1) / 4
    probs, conf, label = softmax_confidence(logits.bfloat16())
    assert probs.dtype == torch.float32 and probs.shape == (1, 3, 1, 2)
    assert label.dtype == torch.long and label.tolist() == [[[2, 1]]]
    assert conf.shape == (1, 1, 2)
    assert conf[0, 0, 1].item() == pytest.approx(0.5, abs=1e-2)


def hand_made():
    conf = torch.tensor([[[0.9, 0.5], [0.97, 0.2]], [[0.99, 0.99], [0.1, 0.8]]])
    label = torch.tensor([[[0, 1], [2, IGN]], [[1, 1], [0, 2]]])
    return conf, label


def test_select_threshold_exact():
    conf, label = hand_made()
    out, w = select_threshold(conf, label, tau=0.8)
    assert out.tolist() == [[[0, IGN], [2, IGN]], [[1, 1], [IGN, 2]]]
    assert w.tolist() == [[[1, 0], [1, 0]], [[1, 1], [0, 1]]]
    assert out.dtype == torch.long and w.dtype == torch.float32


def test_confidence_ratio_weight_exact():
    conf, label = hand_made()
    out, w = confidence_ratio_weight(conf, label, tau=0.85)
    assert torch.equal(out, label)
    # image 0: 3 valid pixels, 2 above tau (0.9, 0.97) -> 2/3; the ignored pixel gets 0
    # image 1: 4 valid pixels, 2 above tau -> 1/2
    expected = torch.tensor([[[2 / 3, 2 / 3], [2 / 3, 0.0]], [[0.5, 0.5], [0.5, 0.5]]])
    torch.testing.assert_close(w, expected)


def test_select_none_exact():
    conf, label = hand_made()
    out, w = select_none(conf, label)
    assert torch.equal(out, label)
    assert w.tolist() == [[[1, 1], [1, 0]], [[1, 1], [1, 1]]]


def test_class_balanced_exact_small_case():
    # class 0: conf 0.1 .. 0.4 (4 px), class 1: 0.95, 0.99 (2 px), class 2: absent, one ignore pixel
    conf = torch.tensor([[[0.1, 0.2, 0.3, 0.4, 0.95, 0.99, 0.5]]])
    label = torch.tensor([[[0, 0, 0, 0, 1, 1, IGN]]])
    out, w = select_class_balanced(conf, label, num_classes=3, percentile=50.0)
    assert out.tolist() == [[[IGN, IGN, 0, 0, IGN, 1, IGN]]]
    assert w.tolist() == [[[0, 0, 1, 1, 0, 1, 0]]]
    out, _ = select_class_balanced(conf, label, num_classes=3, percentile=100.0)
    assert out.tolist() == label.tolist()
    out, w = select_class_balanced(conf, label, num_classes=3, percentile=0.0)
    assert (out == IGN).all() and (w == 0).all()
    # tau_max caps every threshold: class 0's 0.3 and class 1's 0.99 become 0.15
    out, _ = select_class_balanced(conf, label, num_classes=3, percentile=50.0, tau_max=0.15)
    assert out.tolist() == [[[IGN, 0, 0, 0, 1, 1, IGN]]]


def test_class_balanced_keeps_about_p_percent_of_every_class_and_rare_classes():
    g = torch.Generator().manual_seed(0)
    b, h, w = 2, 40, 50
    label = torch.zeros(b, h, w, dtype=torch.long)
    label[:, :, 25:] = 1
    label[:, :4, :5] = 2  # a rare class (40 px), always unsure
    conf = torch.rand(b, h, w, generator=g) * 0.05 + 0.95  # road / building: very confident
    rare = label == 2
    conf[rare] = torch.rand(int(rare.sum()), generator=g) * 0.3 + 0.3  # 0.3 .. 0.6
    out, wt = select_class_balanced(conf, label, num_classes=4, percentile=30.0)
    for c in range(3):
        n = (label == c).sum().item()
        kept = ((out == c) & (label == c)).sum().item()
        assert abs(kept / n - 0.3) <= 1.0 / n + 1e-6, (c, kept, n)
    assert torch.equal(out[out != IGN], label[out != IGN])
    assert torch.equal(wt, (out != IGN).float())
    # a global threshold at the same tau would keep nothing of the rare class
    glob, _ = select_threshold(conf, label, tau=0.9)
    assert (glob == 2).sum() == 0 and (out == 2).sum() > 0


def test_class_balanced_subsampled_thresholds():
    g = torch.Generator().manual_seed(1)
    conf = torch.rand(1, 64, 64, generator=g)
    label = torch.randint(0, 3, (1, 64, 64), generator=g)
    out, _ = select_class_balanced(conf, label, num_classes=3, percentile=50.0, max_samples=1000)
    for c in range(3):
        frac = (out == c).sum().item() / (label == c).sum().item()
        assert 0.4 < frac < 0.6


def test_select_pseudo_labels_dispatch_and_error():
    conf, label = hand_made()
    assert set(POLICIES) == {"ratio", "threshold", "class_balanced", "none"}
    out, w = select_pseudo_labels("threshold", conf, label, num_classes=3, tau=0.8)
    ref = select_threshold(conf, label, tau=0.8)
    assert torch.equal(out, ref[0]) and torch.equal(w, ref[1])
    for name in POLICIES:
        out, w = select_pseudo_labels(name, conf, label, num_classes=3)
        assert out.shape == w.shape == label.shape
        assert ((w >= 0) & (w <= 1)).all() and (w[out == IGN] == 0).all()
    with pytest.raises(ValueError, match="choices: ratio, threshold, class_balanced, none"):
        select_pseudo_labels("cbst", conf, label, num_classes=3)


# -- prototypes ---------------------------------------------------------------------------------------------------


def feats_from_points(points: torch.Tensor) -> torch.Tensor:
    """``(h, w, D)`` -> features ``(1, D, h, w)``."""
    return points.permute(2, 0, 1)[None].contiguous()


def test_prototype_first_update_takes_the_batch_mean_and_ignores_ignore():
    mem = PrototypeMemory(3, 2, momentum=0.1)
    pts = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [100.0, 100.0]]])  # (1, 4, 2)
    labels = torch.tensor([[[0, 0, 1, IGN]]])
    mem.update(feats_from_points(pts), labels)
    torch.testing.assert_close(mem.centroids[0], torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(mem.centroids[1], torch.tensor([0.0, 2.0]))
    assert mem.initialized.tolist() == [True, True, False]
    torch.testing.assert_close(mem.centroids[2], torch.zeros(2))  # absent: unchanged

    # second update: momentum 0.1 towards the new batch mean; class 1 absent -> unchanged
    pts2 = torch.tensor([[[4.0, 2.0], [0.0, 0.0], [-1.0, -1.0]]])
    labels2 = torch.tensor([[[0, 2, 2]]])
    mem.update(feats_from_points(pts2).bfloat16(), labels2)
    torch.testing.assert_close(mem.centroids[0], 0.9 * torch.tensor([2.0, 0.0]) + 0.1 * torch.tensor([4.0, 2.0]))
    torch.testing.assert_close(mem.centroids[1], torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(mem.centroids[2], torch.tensor([-0.5, -0.5]))  # first time: the mean itself
    assert mem.centroids.dtype == torch.float32


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_prototype_nearest(metric):
    mem = PrototypeMemory(4, 2, metric=metric)
    centres = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    mem.update(feats_from_points(centres[None]), torch.tensor([[[0, 1, 2]]]))  # class 3 never seen
    pts = torch.tensor([[[0.9, 0.1], [0.2, 0.8], [-2.0, 0.3], [0.0, -1.0]]])
    out = mem.nearest(feats_from_points(pts))
    assert out.dtype == torch.long and out.shape == (1, 1, 4)
    # (0, -1) is equally far from classes 0 and 2 and closest to the uninitialised class 3 (zero centroid in
    # euclidean): never 3
    assert out[0, 0, :3].tolist() == [0, 1, 2] and out[0, 0, 3].item() in (0, 2)
    sim = mem.similarity(feats_from_points(pts))
    assert sim.shape == (1, 4, 1, 4) and sim.dtype == torch.float32


def test_prototype_nearest_before_any_update_is_ignore():
    mem = PrototypeMemory(3, 2)
    assert (mem.nearest(torch.rand(2, 2, 3, 3)) == IGN).all()


def test_prototype_labels_resized_and_state_dict():
    mem = PrototypeMemory(2, 3)
    feats = torch.ones(1, 3, 2, 2)
    labels = torch.zeros(1, 4, 4, dtype=torch.long)  # full-size labels, resized to (2, 2)
    mem.update(feats, labels)
    sd = mem.state_dict()
    assert set(sd) == {"centroids", "initialized"}
    other = PrototypeMemory(2, 3)
    other.load_state_dict(sd)
    assert torch.equal(other.centroids, mem.centroids) and other.initialized.tolist() == [True, False]
    with pytest.raises(ValueError, match="expected features of shape"):
        mem.update(torch.ones(1, 5, 2, 2), labels)


def test_bilateral_consensus():
    offline = torch.tensor([[[0, 1, 2, IGN]]], dtype=torch.uint8)
    proto = torch.tensor([[[0, 2, 2, 1]]])
    out = bilateral_consensus(offline, proto)
    assert out.dtype == torch.long and out.tolist() == [[[0, IGN, 2, IGN]]]


def test_pseudo_label_stats():
    label = torch.tensor([[[0, 1, IGN, 1]], [[IGN, IGN, 1, 2]]])
    conf = torch.tensor([[[0.5, 0.7, 0.1, 0.9]], [[0.2, 0.2, 1.0, 0.9]]])
    s = pseudo_label_stats(label, conf, num_classes=4)
    assert s["kept_frac"].item() == pytest.approx(5 / 8)
    assert s["mean_conf"].item() == pytest.approx((0.5 + 0.7 + 0.9 + 1.0 + 0.9) / 5)
    torch.testing.assert_close(s["class_hist"], torch.tensor([1 / 5, 3 / 5, 1 / 5, 0.0]))
    s = pseudo_label_stats(torch.full((1, 2, 2), IGN), None, num_classes=3)
    assert "mean_conf" not in s and s["kept_frac"].item() == 0 and (s["class_hist"] == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_hot_path_does_not_sync_with_the_host():
    from torch import nn

    from sfdaseg.models.ema import EMATeacher

    dev = torch.device("cuda")
    logits = torch.randn(2, 5, 32, 48, device=dev)
    feats = torch.randn(2, 8, 8, 12, device=dev, dtype=torch.bfloat16)
    student = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to(dev)
    teacher = EMATeacher(student)
    mem = PrototypeMemory(5, 8).to(dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _, conf, label = softmax_confidence(logits)
        for name in POLICIES:
            select_pseudo_labels(name, conf, label, num_classes=5)
        select_class_balanced(conf, label, num_classes=5, percentile=20.0, max_samples=500)
        mem.update(feats, label[:, ::4, ::4])
        proto = mem.nearest(feats)
        bilateral_consensus(label[:, ::4, ::4], proto)
        pseudo_label_stats(label, conf, num_classes=5)
        teacher.update(student, 3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
