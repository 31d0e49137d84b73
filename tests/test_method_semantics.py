"""What each recipe's step really trains on (issue 17): DiGA's consensus and distillation, STvM's metric losses,
reliability and MOCM, DUDA's warm-up, against brute-force formulas and by looking inside one step."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sfdaseg.config import AdaptConfig, load_config
from sfdaseg.data.classes import CITYSCAPES19
from sfdaseg.methods import RECIPES
from sfdaseg.methods.common import AdaptContext
from sfdaseg.methods.stvm import (mocm_class_scores, proxy_anchor_loss, proxy_nca_loss, proxy_softmax_loss,
                                  reliability_at)
from sfdaseg.models import build_model
from sfdaseg.pseudo_labels import PrototypeMemory


def _task(recipe: str, *overrides: str):
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=19, width=4)
    cfg = load_config(AdaptConfig, overrides=[f"recipe={recipe}", f"checkpoint={__file__}", *overrides])
    ctx = AdaptContext(model=model, classes=CITYSCAPES19, device=torch.device("cpu"), export="teacher", iters=10,
                       batch_size=2)
    task = RECIPES[recipe].build(ctx, cfg.method_config())
    task.wrap_trainable(lambda n, m: m)
    return task


def _batch(b: int = 2, h: int = 32, w: int = 64, offline: bool = False) -> dict:
    torch.manual_seed(1)
    batch = {"image": torch.randint(0, 255, (b, 3, h, w), dtype=torch.uint8)}
    if offline:
        batch["pl_label"] = torch.randint(0, 19, (b, h, w), dtype=torch.uint8)
        batch["pl_conf"] = torch.full((b, h, w), 200, dtype=torch.uint8)
    return batch


# ----------------------------------------------------------------------------------------------------- DiGA


def test_diga_trains_on_the_consensus_labels_and_moves_centroids_from_consensus_and_argmax(monkeypatch):
    task = _task("diga_sf", "method.classmix=false", "method.photometric=false", "method.reverse_weight=0",
                 "method.proto_init_images=0")
    batch = _batch(offline=True)
    torch.manual_seed(2)
    task.protos.centroids.copy_(torch.randn(19, task.protos.dim))
    task.protos.initialized.fill_(True)
    before = task.protos.centroids.clone()
    with torch.no_grad():
        t_logits, t_feat = task.teacher(batch["image"].float() / 255, return_features=True)
        nearest = F.interpolate(task.protos.nearest(t_feat)[:, None].float(), size=(32, 64), mode="nearest")[:, 0]
    expected = torch.where(batch["pl_label"].long() == nearest.long(), batch["pl_label"].long(), 255)
    seen = {}
    import sfdaseg.methods.diga_sf as mod

    def spy(logits, target, **kw):
        seen["target"] = target.clone()
        return F.cross_entropy(F.interpolate(logits, size=target.shape[-2:], mode="bilinear"), target.long(),
                               ignore_index=255)

    monkeypatch.setattr(mod, "seg_cross_entropy", spy)
    task.training_step(batch, 0)
    assert torch.equal(seen["target"], expected)  # the consensus labels are the ones trained on
    # The update: per image, from consensus labels where the teacher's argmax agrees, classes with >= 5 pixels.
    argmax = F.interpolate(t_logits, size=(32, 64), mode="bilinear").argmax(1)
    agreed = torch.where(expected == argmax, expected, 255)
    ref = PrototypeMemory(19, task.protos.dim, momentum=task.cfg.proto_momentum, metric="euclidean")
    ref.centroids.copy_(before)
    ref.initialized.fill_(True)
    ref.update_per_image(t_feat, agreed, min_pixels=5)
    assert torch.allclose(task.protos.centroids, ref.centroids)
    assert not torch.equal(task.protos.centroids, before) or int((agreed != 255).sum()) == 0


def test_diga_mixes_teacher_probabilities_with_the_labels_mask_and_weights_the_distillation(monkeypatch):
    task = _task("diga_sf", "method.photometric=false", "method.proto_init_images=0", "method.consensus=false",
                 "method.distill_weight=0.25", "method.reverse_weight=0.5")
    import sfdaseg.strong_view as sv

    record = {}
    real_masks, real_mix = sv.classmix_masks, task.view.mix

    def masks(labels, **kw):
        record["mask"] = real_masks(labels, **kw)
        return record["mask"]

    def mix(label, x, *maps, class_scores=None):
        out = real_mix(label, x, *maps, class_scores=class_scores)
        record.update(label=label, t_probs=maps[0], y_mix=out[1], t_mix=out[2])
        return out

    monkeypatch.setattr(sv, "classmix_masks", masks)
    monkeypatch.setattr(task.view, "mix", mix)
    out = task.training_step(_batch(offline=True), 0)
    partner = (torch.arange(2) - 1) % 2  # output j takes the pasted pixels of image j - 1
    pasted = record["mask"][partner]  # (B, H, W): where output j shows image j - 1
    assert pasted.any() and (~pasted).any()
    expect_t = torch.where(pasted[:, None], record["t_probs"][partner], record["t_probs"])
    expect_y = torch.where(pasted, record["label"][partner], record["label"])
    assert torch.equal(record["t_mix"], expect_t) and torch.equal(record["y_mix"], expect_y)
    logs = out.logs
    expected = logs["loss_ce"] + 0.25 * (logs["loss_kd"] + 0.5 * logs["loss_kd_rev"])
    assert torch.allclose(out.loss.detach(), expected, atol=1e-5)


def test_offline_logit_fusion_is_the_softmax_of_the_max_logits():
    from sfdaseg.offline_labels import _label_image

    class TwoScale(torch.nn.Module):
        """Logits that depend on the input size: scale 1 favours class 0, scale 0.5 class 1 (mildly)."""

        def forward(self, x):
            big = x.shape[-1] >= 8
            z = torch.tensor([3.0, 0.0, 0.0]) if big else torch.tensor([0.0, 2.0, 1.9])
            return z.view(1, 3, 1, 1).expand(x.shape[0], 3, x.shape[2], x.shape[3])

    images = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    label_l, conf_l = _label_image(TwoScale(), images, scales=(1.0, 0.5), resize=None, amp_dtype=None,
                                   fusion="logits")
    label_p, conf_p = _label_image(TwoScale(), images, scales=(1.0, 0.5), resize=None, amp_dtype=None,
                                   fusion="probs")
    z = torch.tensor([3.0, 2.0, 1.9])  # the element-wise max of both scales' logits
    assert int(label_l[0, 0, 0]) == 0 and int(conf_l[0, 0, 0]) == round(float(torch.softmax(z, 0)[0]) * 255)
    p1 = torch.softmax(torch.tensor([3.0, 0, 0]), 0)
    assert int(conf_p[0, 0, 0]) == round(float(p1[0]) * 255)  # max of probabilities: scale 1's own


def test_euclidean_centroids_differ_from_cosine_where_norms_matter():
    mem_e = PrototypeMemory(2, 2, metric="euclidean")
    mem_c = PrototypeMemory(2, 2, metric="cosine")
    for m in (mem_e, mem_c):
        m.centroids.copy_(torch.tensor([[1.0, 0.0], [10.0, 1.0]]))
        m.initialized.fill_(True)
    f = torch.tensor([[9.0], [0.0]]).view(1, 2, 1, 1)  # near class 1 in distance, aligned with class 0 in angle
    assert int(mem_e.nearest(f)) == 1 and int(mem_c.nearest(f)) == 0


# ----------------------------------------------------------------------------------------------------- STvM


def _brute_proxy_anchor(sim, labels, num_classes, alpha, delta):
    pos_terms, neg_terms = [], []
    for c in range(num_classes):
        pos = [sim[i, c] for i in range(len(labels)) if labels[i] == c]
        neg = [sim[i, c] for i in range(len(labels)) if labels[i] != c]
        if pos:
            pos_terms.append(math.log(1 + sum(math.exp(-alpha * (float(s) - delta)) for s in pos)))
        neg_terms.append(math.log(1 + sum(math.exp(alpha * (float(s) + delta)) for s in neg)))
    return sum(pos_terms) / len(pos_terms) + sum(neg_terms) / num_classes


def test_proxy_anchor_matches_the_brute_force_formula():
    torch.manual_seed(0)
    sim = torch.rand(12, 4) * 2 - 1
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 1, 2, 0, 1])  # class 3 has no positive
    got = proxy_anchor_loss(sim, labels, num_classes=4, alpha=4.0, delta=0.1)
    assert math.isclose(float(got), _brute_proxy_anchor(sim, labels, 4, 4.0, 0.1), rel_tol=1e-5)


def test_proxy_nca_leaves_the_positive_out_and_proxy_softmax_keeps_it():
    torch.manual_seed(0)
    sim = torch.rand(5, 3) * 2 - 1
    labels = torch.tensor([0, 1, 2, 1, 0])
    s = 3.0
    d = 2 - 2 * sim
    nca = sum(float(s * d[i, y] + torch.logsumexp(-s * d[i, [c for c in range(3) if c != y]], 0))
              for i, y in enumerate(labels.tolist())) / 5
    assert math.isclose(float(proxy_nca_loss(sim, labels, scale=s)), nca, rel_tol=1e-5)
    soft = sum(float(-torch.log_softmax(s * sim[i], 0)[y]) for i, y in enumerate(labels.tolist())) / 5
    assert math.isclose(float(proxy_softmax_loss(sim, labels, scale=s)), soft, rel_tol=1e-5)


def test_reliability_is_read_at_the_teachers_class_and_mocm_scores_reach_the_mix(monkeypatch):
    sim = torch.tensor([[0.9, 0.1], [0.2, 0.8]]).T.reshape(1, 2, 1, 2)  # pixel 0 near class 0, pixel 1 class 1
    label = torch.tensor([[[1, 1]]])
    rel = reliability_at(sim, label, scale=10.0)
    expect = torch.softmax(10.0 * sim, 1)[:, 1:2]
    assert torch.allclose(rel, expect) and rel[0, 0, 0, 0] < rel[0, 0, 0, 1]
    scores = mocm_class_scores(torch.tensor([[[0, 0, 1, 255]]]), torch.tensor([[[[0.2, 0.4, 0.9, 0.5]]]]),
                               num_classes=3)
    assert torch.allclose(scores, torch.tensor([[0.3, 0.9, 0.0]]))  # per-class mean; padding not counted
    # In the step, the scores MOCM computes are what ClassMix draws classes with.
    task = _task("stvm", "method.photometric=false")
    seen = {}
    real = task.view.mix

    def mix(label, x, *maps, class_scores=None):
        seen["scores"] = class_scores
        return real(label, x, *maps, class_scores=class_scores)

    monkeypatch.setattr(task.view, "mix", mix)
    task.training_step(_batch(), 0)
    assert seen["scores"] is not None and seen["scores"].shape == (2, 19)
    off = _task("stvm", "method.photometric=false", "method.mocm=false")
    monkeypatch.setattr(off.view, "mix", mix)
    off.training_step(_batch(), 0)
    assert seen["scores"] is None


def test_the_metric_network_learns_at_its_own_rate():
    from sfdaseg.config import OptimConfig
    from sfdaseg.engine.trainer import build_param_groups

    task = _task("stvm", "method.metric_lr_mult=10")
    groups = build_param_groups(task.trainable_modules(), OptimConfig(lr=1e-4, head_lr_mult=1.0))
    lrs = {g["name"].split("/")[0]: g["lr"] for g in groups}
    assert lrs["metric"] == pytest.approx(1e-3) and lrs["student"] == pytest.approx(1e-4)


# ----------------------------------------------------------------------------------------------------- DUDA


def test_duda_small_student_distils_from_the_source_first_without_a_small_source_checkpoint():
    task = _task("duda", "method.student=tiny", "method.student_options={width: 4}")
    assert task.warmup_steps == round(0.25 * 10)  # auto: a quarter of the run without student_checkpoint
    out = task.training_step(_batch(), 0)
    assert set(out.logs) == {"loss_warmup_kd"}  # only the small student learns, from the frozen source
    out.loss.backward()
    assert all(p.grad is None for p in task.student.parameters())  # the large student is untouched
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in task.small.parameters())
    assert task.kd_weight(task.warmup_steps) == 0.0  # the gradual schedule starts after the warm-up
    main = task.training_step(_batch(), task.warmup_steps)
    assert "loss_large" in main.logs and "loss_kd" in main.logs
