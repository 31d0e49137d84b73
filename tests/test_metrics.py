"""ConfusionMatrix and SegMetrics: hand-computed scores, NaN handling, ignore index, protocols, reduction."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from sfdaseg.data.classes import CITYSCAPES_NAMES, PROTOCOLS
from sfdaseg.evaluation.metrics import ConfusionMatrix, SegMetrics, _histogram, resolve_protocol

# A 2x3 example small enough to count by hand (255 is ignored):
#   target [[0, 0, 1],     pred [[0, 1, 1],
#           [1, 2, 255]]         [2, 2, 0]]
# (true, pred) pairs: (0,0) (0,1) (1,1) (1,2) (2,2)
#   class 0: tp 1, fn 1, fp 0 -> 1/2;  class 1: tp 1, fn 1, fp 1 -> 1/3;  class 2: tp 1, fn 0, fp 1 -> 1/2
TARGET = torch.tensor([[[0, 0, 1], [1, 2, 255]]], dtype=torch.uint8)
PRED = torch.tensor([[[0, 1, 1], [2, 2, 0]]])
EXPECTED_IOU = [50.0, 100.0 / 3.0, 50.0]


def reference_iou(pred: np.ndarray, target: np.ndarray, n: int) -> np.ndarray:
    """Plain NumPy IoU (percent) over pixels with target in 0..n-1; NaN where tp + fp + fn == 0."""
    keep = target < n
    t, p = target[keep].astype(np.int64), pred[keep].astype(np.int64)
    iou = np.full(n, np.nan)
    for c in range(n):
        tp = np.sum((t == c) & (p == c))
        fp = np.sum((t != c) & (p == c))
        fn = np.sum((t == c) & (p != c))
        if tp + fp + fn:
            iou[c] = 100.0 * tp / (tp + fp + fn)
    return iou


def test_hand_computed_example():
    cm = ConfusionMatrix(3)
    cm.update(PRED, TARGET)
    m = cm.compute(class_names=["a", "b", "c"])
    assert isinstance(m, SegMetrics)
    assert list(m.per_class_iou) == ["a", "b", "c"]
    assert list(m.per_class_iou.values()) == pytest.approx(EXPECTED_IOU, abs=1e-12)
    assert m.miou == pytest.approx(sum(EXPECTED_IOU) / 3, abs=1e-12)
    assert m.pixel_accuracy == pytest.approx(60.0)  # 3 correct of 5 labelled pixels
    assert m.num_images == 1 and m.protocol is None and m.num_classes == 3
    # mat[t, p]; the last column (out-of-range predictions) is empty here
    expected = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0]])
    assert torch.equal(cm.mat, expected)


def test_absent_class_is_nan_and_left_out_of_mean():
    cm = ConfusionMatrix(5)
    cm.update(PRED, TARGET)
    m = cm.compute()
    assert list(m.per_class_iou) == ["0", "1", "2", "3", "4"]  # default names
    assert math.isnan(m.per_class_iou["3"]) and math.isnan(m.per_class_iou["4"])
    assert m.miou == pytest.approx(sum(EXPECTED_IOU) / 3)
    # a class that is only predicted (never labelled) is a 0 and does count
    cm.update(torch.tensor([[3]]), torch.tensor([[0]]))
    m = cm.compute()
    assert m.per_class_iou["3"] == 0.0
    assert math.isnan(m.per_class_iou["4"])


def test_empty_matrix_gives_nan_everywhere():
    m = ConfusionMatrix(2).compute()
    assert math.isnan(m.miou) and math.isnan(m.pixel_accuracy)
    assert all(math.isnan(v) for v in m.per_class_iou.values())
    assert json.loads(json.dumps(m.to_dict(), allow_nan=False))["miou"] is None


def test_ignore_index_and_out_of_range_targets_are_skipped():
    cm = ConfusionMatrix(3)
    cm.update(PRED, TARGET)
    before = cm.mat.clone()
    # ignored (255) and out-of-range (7) targets change nothing, whatever is predicted there
    cm.update(torch.tensor([[0, 1, 2]]), torch.tensor([[255, 255, 7]]))
    assert torch.equal(cm.mat, before)
    # custom ignore index below 255
    cm2 = ConfusionMatrix(3, ignore_index=250)
    cm2.update(torch.tensor([0, 1]), torch.tensor([250, 1]))
    assert cm2.mat.sum() == 1 and cm2.mat[1, 1] == 1


def test_out_of_range_prediction_is_a_false_negative_only():
    # As in the Cityscapes tool: a pixel predicted as a non-class (e.g. 255) misses its true class and is
    # a false positive of nobody.
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 255, 1, 1]), torch.tensor([0, 0, 1, 1]))
    m = cm.compute()
    assert m.per_class_iou == pytest.approx({"0": 50.0, "1": 100.0})
    assert m.pixel_accuracy == pytest.approx(75.0)
    assert cm.mat[0, 2] == 1


def test_matches_reference_on_random_data_and_accumulates_over_batches():
    g = torch.Generator().manual_seed(0)
    n = 7
    target = torch.randint(0, n, (4, 13, 17), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.1] = 255
    noise = torch.randint(0, n, target.shape, generator=g)
    pred = torch.where(torch.rand(target.shape, generator=g) < 0.6, target.clamp(max=n - 1), noise)
    ref = reference_iou(pred.numpy(), target.numpy(), n)
    one = ConfusionMatrix(n)
    one.update(pred, target)
    many = ConfusionMatrix(n)
    for i in range(4):
        many.update(pred[i : i + 1], target[i : i + 1].to(torch.uint8))
    assert torch.equal(one.mat, many.mat)
    assert one.num_images == many.num_images == 4
    m = many.compute()
    np.testing.assert_allclose(list(m.per_class_iou.values()), ref, rtol=0, atol=1e-9)
    assert m.miou == pytest.approx(float(np.nanmean(ref)), abs=1e-9)
    keep = target.numpy() != 255
    acc = 100.0 * np.mean(pred.numpy()[keep] == target.numpy()[keep])
    assert m.pixel_accuracy == pytest.approx(acc, abs=1e-9)


@pytest.mark.parametrize("protocol", [19, 16, 13])
def test_protocols_pick_the_right_classes(protocol):
    g = torch.Generator().manual_seed(protocol)
    target = torch.randint(0, 19, (2, 16, 16), generator=g)
    noise = torch.randint(0, 19, target.shape, generator=g)
    pred = torch.where(torch.rand(target.shape, generator=g) < 0.5, target, noise)
    cm = ConfusionMatrix(19)
    cm.update(pred, target)
    full = cm.compute(class_names=CITYSCAPES_NAMES)
    m = cm.compute(protocol=protocol, class_names=CITYSCAPES_NAMES)
    assert m.protocol == protocol == len(m.per_class_iou)
    expected_names = [CITYSCAPES_NAMES[i] for i in PROTOCOLS[protocol]]
    assert list(m.per_class_iou) == expected_names
    # the IoU of a protocol class comes from the full 19x19 matrix: the same number as without a protocol
    for name in expected_names:
        assert m.per_class_iou[name] == full.per_class_iou[name]
    assert m.miou == pytest.approx(float(np.mean([full.per_class_iou[k] for k in expected_names])))
    assert m.pixel_accuracy == full.pixel_accuracy  # over every labelled pixel, whatever the protocol
    if protocol == 16:
        assert not {"terrain", "truck", "train"} & set(m.per_class_iou)
    if protocol == 13:
        assert not {"terrain", "truck", "train", "wall", "fence", "pole"} & set(m.per_class_iou)


def test_protocol_validation():
    assert resolve_protocol(None, 5) is None
    assert resolve_protocol([3, 1], 5) == (3, 1)
    with pytest.raises(ValueError, match="19-class model"):
        resolve_protocol(16, 10)
    with pytest.raises(ValueError, match="one of"):
        resolve_protocol(15, 19)
    with pytest.raises(ValueError, match="distinct class indices"):
        resolve_protocol([0, 0], 5)
    with pytest.raises(ValueError, match="distinct class indices"):
        resolve_protocol([5], 5)
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="3 names"):
        cm.compute(class_names=["a"])


def test_update_rejects_bad_inputs():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="same shape"):
        cm.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="argmax"):
        cm.update(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))


def test_reset_and_num_images():
    cm = ConfusionMatrix(3)
    cm.update(PRED.expand(3, -1, -1), TARGET.expand(3, -1, -1))
    cm.update(PRED[0], TARGET[0])  # an (H, W) pair is one image
    assert cm.num_images == 4 and cm.mat.sum() == 4 * 5
    cm.reset()
    assert cm.num_images == 0 and cm.mat.sum() == 0


def test_sync_free_histogram_matches_bincount():
    idx = torch.randint(0, 50, (1000,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(_histogram(idx, 51, sync_free=True), _histogram(idx, 51, sync_free=False))
    assert torch.equal(_histogram(idx, 51, sync_free=False), torch.bincount(idx, minlength=51))


def test_all_reduce_without_process_group_is_a_no_op():
    cm = ConfusionMatrix(3)
    cm.update(PRED, TARGET)
    before = cm.mat.clone()
    cm.all_reduce()
    assert torch.equal(cm.mat, before) and cm.num_images == 1


def test_to_dict_is_json_and_table_lists_classes():
    cm = ConfusionMatrix(4)
    cm.update(PRED, TARGET)
    m = cm.compute(class_names=["road", "sidewalk", "building", "wall"])
    d = json.loads(json.dumps(m.to_dict(), allow_nan=False))
    assert {"miou", "per_class_iou", "pixel_accuracy", "protocol", "num_images"} <= set(d)
    assert d["per_class_iou"]["wall"] is None
    assert d["per_class_iou"]["sidewalk"] == pytest.approx(100 / 3)
    assert d["miou"] == pytest.approx(sum(EXPECTED_IOU) / 3)
    assert d["units"] == "percent" and d["protocol"] is None and d["num_images"] == 1
    table = m.format_table()
    lines = table.splitlines()
    assert lines[0].startswith("class") and "IoU (%)" in lines[0]
    assert any(line.startswith("sidewalk") and line.rstrip().endswith("33.33") for line in lines)
    assert any(line.startswith("wall") and line.rstrip().endswith("n/a") for line in lines)
    assert any(line.startswith("mIoU (4 classes)") and line.rstrip().endswith("44.44") for line in lines)


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cm = ConfusionMatrix(3)
        # rank 0 sees the hand example, rank 1 the same example twice
        for _ in range(rank + 1):
            cm.update(PRED, TARGET)
        cm.all_reduce()
        torch.save({"mat": cm.mat, "num_images": cm.num_images}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_all_reduce_sums_over_two_gloo_processes(tmp_path):
    import torch.multiprocessing as mp

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = ConfusionMatrix(3)
    single.update(PRED, TARGET)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert torch.equal(out["mat"], 3 * single.mat)
        assert out["num_images"] == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_update_on_cuda_has_no_host_sync_and_matches_cpu():
    g = torch.Generator().manual_seed(3)
    target = torch.randint(0, 19, (2, 64, 96), generator=g)
    target[:, :5] = 255
    pred = torch.randint(0, 19, target.shape, generator=g)
    pred[:, -3:] = 255
    cpu = ConfusionMatrix(19)
    cpu.update(pred, target)
    gpu = ConfusionMatrix(19, device="cuda")
    pred_cuda, target_cuda = pred.cuda(), target.to(torch.uint8).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device->host sync inside update raises
    try:
        gpu.update(pred_cuda, target_cuda)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(gpu.mat.cpu(), cpu.mat)
    assert gpu.compute().miou == pytest.approx(cpu.compute().miou)
