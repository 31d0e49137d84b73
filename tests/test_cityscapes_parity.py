"""Parity with the official Cityscapes tool (cityscapesscripts' evalPixelLevelSemanticLabeling).

Structured random trainId labels and predictions are written as Cityscapes-named labelId PNGs into
``tmp_path`` and scored by ``evaluateImgLists``; our ConfusionMatrix must give the same class IoUs, the same
mean (19 classes, and the 16/13-class subsets of the same IoUs) and the same pixel accuracy. Theirs are
fractions, ours percent.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from PIL import Image

from sfdaseg.data.classes import CITYSCAPES_NAMES, IGNORE_INDEX, PROTOCOLS, TRAINID_TO_LABELID
from sfdaseg.evaluation import ConfusionMatrix

H, W = 32, 64


def structured_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Label and prediction (trainIds, uint8, ``(H, W)``): random rectangles of classes, some ignored pixels,
    and a prediction that is the label with shifted boxes, swapped classes and noise; a few predicted
    pixels are 255 (a non-class, 'unlabeled' for the official tool)."""
    label = np.full((H, W), rng.integers(0, 19), dtype=np.uint8)
    for _ in range(12):
        y, x = rng.integers(0, H - 4), rng.integers(0, W - 4)
        h, w = rng.integers(3, H // 2), rng.integers(3, W // 2)
        label[y : y + h, x : x + w] = rng.choice([*range(19), IGNORE_INDEX], p=[0.9 / 19] * 19 + [0.1])
    # keep class 9 (terrain) out of the labels so that it can only be a false positive, and class 16
    # (train) out of everything so that its IoU is NaN on both sides
    label[label == 9] = 8
    label[label == 16] = 15
    pred = np.roll(label, shift=(rng.integers(-3, 4), rng.integers(-3, 4)), axis=(0, 1)).copy()
    pred[pred == IGNORE_INDEX] = rng.integers(0, 16)
    noise = rng.random((H, W)) < 0.15
    pred[noise] = rng.choice([c for c in range(19) if c != 16], size=int(noise.sum()))
    pred[rng.random((H, W)) < 0.02] = IGNORE_INDEX
    return label, pred


def to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """trainId -> Cityscapes labelId; 255 (ignored) -> 0 ('unlabeled', ignored in evaluation)."""
    lut = np.zeros(256, dtype=np.uint8)
    for train_id, label_id in TRAINID_TO_LABELID.items():
        lut[train_id] = label_id
    return lut[train_ids]


@pytest.fixture
def cityscapes_eval(monkeypatch, tmp_path):
    # The module reads these at import and would otherwise point into site-packages.
    monkeypatch.setenv("CITYSCAPES_DATASET", str(tmp_path))
    monkeypatch.setenv("CITYSCAPES_RESULTS", str(tmp_path / "results"))
    monkeypatch.delenv("CITYSCAPES_EXPORT_DIR", raising=False)
    mod = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    if not hasattr(np, "in1d"):  # removed in NumPy 2.4; the tool still calls it
        monkeypatch.setattr(np, "in1d", np.isin, raising=False)
    args = copy.copy(mod.args)  # leave the module's global settings alone
    args.evalInstLevelScore = False  # needs instanceIds images
    args.evalPixelAccuracy = False  # its per-image accuracy counts the wrong pixels; we use its matrix
    args.JSONOutput = False
    args.exportFile = str(tmp_path / "evaluationResults" / "result.json")
    args.quiet = True
    args.colorized = False
    args.predictionPath = str(tmp_path / "results")
    args.predictionWalk = None
    return mod, args


def test_matches_official_cityscapes_evaluation(cityscapes_eval, tmp_path):
    mod, args = cityscapes_eval
    rng = np.random.default_rng(2024)
    gt_dir = tmp_path / "gtFine" / "val" / "frankfurt"
    pred_dir = tmp_path / "results"
    gt_dir.mkdir(parents=True)
    pred_dir.mkdir()
    cm = ConfusionMatrix(19)
    gt_files, pred_files = [], []
    for i in range(4):
        label, pred = structured_pair(rng)
        stem = f"frankfurt_{i:06d}_{19 * i:06d}"
        gt_files.append(str(gt_dir / f"{stem}_gtFine_labelIds.png"))
        pred_files.append(str(pred_dir / f"{stem}_pred.png"))
        Image.fromarray(to_label_ids(label), mode="L").save(gt_files[-1])
        Image.fromarray(to_label_ids(pred), mode="L").save(pred_files[-1])
        cm.update(torch.from_numpy(pred).unsqueeze(0), torch.from_numpy(label).unsqueeze(0))

    result = mod.evaluateImgLists(pred_files, gt_files, args)

    ours = cm.compute(class_names=CITYSCAPES_NAMES)
    theirs = result["classScores"]
    for name in CITYSCAPES_NAMES:
        if math.isnan(theirs[name]):
            assert math.isnan(ours.per_class_iou[name]), name
        else:
            assert ours.per_class_iou[name] / 100 == pytest.approx(theirs[name], abs=1e-9), name
    assert math.isnan(ours.per_class_iou["train"])  # absent on both sides, left out of both means
    assert ours.per_class_iou["terrain"] == 0.0  # predicted, never labelled
    assert ours.miou / 100 == pytest.approx(result["averageScoreClasses"], abs=1e-6)

    # 16/13-class protocols: the mean of the official per-class IoUs over the protocol's classes
    for protocol in (16, 13):
        names = [CITYSCAPES_NAMES[i] for i in PROTOCOLS[protocol]]
        expected = np.nanmean([theirs[n] for n in names])
        assert cm.compute(protocol=protocol).miou / 100 == pytest.approx(expected, abs=1e-6)

    # pixel accuracy from the official confusion matrix (rows: labelIds evaluated, columns: predictions)
    conf = np.asarray(result["confMatrix"], dtype=np.float64)
    evaluated = list(TRAINID_TO_LABELID.values())
    correct = sum(conf[i, i] for i in evaluated)
    assert ours.pixel_accuracy / 100 == pytest.approx(correct / conf[evaluated].sum(), abs=1e-9)
    assert conf[evaluated].sum() == cm.mat.sum()  # the same pixels were counted
    assert not (tmp_path / "evaluationResults").exists()  # nothing exported
