"""predict_logits (whole, slide, flip, multi-scale, padding, amp) and evaluate() on fake loaders."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from sfdaseg.evaluation import ConfusionMatrix, evaluate, predict, predict_logits


class PixelModel(nn.Module):
    """A 1x1 convolution (stride 1): every output pixel depends on its own input pixel only."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.num_classes = num_classes
        self.output_stride = 1
        self.conv = nn.Conv2d(3, num_classes, 1)
        self.seen: list[tuple[int, ...]] = []
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(num_classes, 3, 1, 1, generator=torch.Generator().manual_seed(0)) * 4)

    def forward(self, x):
        self.seen.append(tuple(x.shape))
        return self.conv(x)


class StridedModel(PixelModel):
    """1x1 convolution then 4x4 average pooling: logits at stride 4."""

    def __init__(self, num_classes: int = 5):
        super().__init__(num_classes)
        self.output_stride = 4

    def forward(self, x):
        return F.avg_pool2d(super().forward(x), 4)


class RampModel(PixelModel):
    """Not flip-equivariant: adds a left-to-right ramp to class 0's logit."""

    def forward(self, x):
        out = super().forward(x)
        ramp = torch.linspace(-3, 3, x.shape[-1], device=x.device)
        out[:, 0] += ramp
        return out


def images(b=2, h=24, w=40, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_whole_is_softmax_of_upsampled_logits():
    model = StridedModel().eval()
    x = images()
    probs = predict_logits(model, x)
    assert probs.shape == (2, 5, 24, 40) and probs.dtype == torch.float32
    expected = F.interpolate(model(x), size=(24, 40), mode="bilinear", align_corners=False).softmax(1)
    torch.testing.assert_close(probs, expected)
    assert torch.equal(predict(model, x), expected.argmax(1))
    # a custom output size: one interpolation from the model's stride to it
    big = F.interpolate(model(x), size=(48, 80), mode="bilinear", align_corners=False).softmax(1)
    torch.testing.assert_close(predict_logits(model, x, output_size=(48, 80)), big)


@pytest.mark.parametrize("crop,stride", [((16, 16), (8, 8)), ((10, 24), (7, 9)), ((24, 40), (24, 40)), (12, None)])
def test_slide_equals_whole_for_a_pixelwise_model(crop, stride):
    model = PixelModel().eval()
    x = images(b=3)
    whole = predict_logits(model, x)
    model.seen.clear()
    slide = predict_logits(model, x, mode="slide", crop=crop, stride=stride, window_batch=4)
    torch.testing.assert_close(slide, whole, atol=1e-6, rtol=1e-6)
    ch, cw = (crop, crop) if isinstance(crop, int) else crop
    assert all(s[-2:] == (ch, cw) for s in model.seen)  # every window has the crop size
    assert all(s[0] <= 4 for s in model.seen)  # windows are batched window_batch at a time


def test_slide_windows_batching_does_not_change_the_result():
    model = StridedModel().eval()
    x = images(b=2, h=32, w=48)
    a = predict_logits(model, x, mode="slide", crop=(16, 16), stride=(12, 12), window_batch=1)
    b = predict_logits(model, x, mode="slide", crop=(16, 16), stride=(12, 12), window_batch=64)
    torch.testing.assert_close(a, b)


def test_slide_pads_images_smaller_than_the_crop():
    model = PixelModel().eval()
    x = images(b=2, h=20, w=30)
    model.seen.clear()
    probs = predict_logits(model, x, mode="slide", crop=(32, 48))
    assert model.seen == [(2, 3, 32, 48)]  # one padded window per image
    assert probs.shape == (2, 5, 20, 30)
    torch.testing.assert_close(probs, predict_logits(model, x), atol=1e-6, rtol=1e-6)
    # only one side smaller than the crop: padded on that side, slid on the other
    model.seen.clear()
    probs = predict_logits(model, images(b=1, h=20, w=60), mode="slide", crop=(32, 32), stride=(16, 16))
    assert probs.shape == (1, 5, 20, 60)
    assert all(s[-2:] == (32, 32) for s in model.seen)


def test_flip_is_a_no_op_for_an_equivariant_model_and_averages_otherwise():
    x = images()
    model = PixelModel().eval()
    torch.testing.assert_close(predict_logits(model, x, flip=True), predict_logits(model, x), atol=1e-6, rtol=1e-6)

    ramp = RampModel().eval()
    plain = ramp(x).softmax(1)
    flipped = ramp(x.flip(-1)).flip(-1).softmax(1)
    torch.testing.assert_close(predict_logits(ramp, x, flip=True), (plain + flipped) / 2)
    # a left-right symmetric image gets a left-right symmetric prediction with flip averaging
    sym = torch.cat([x[..., :20], x[..., :20].flip(-1)], dim=-1)
    probs = predict_logits(ramp, sym, flip=True)
    torch.testing.assert_close(probs, probs.flip(-1))
    assert not torch.allclose(predict_logits(ramp, sym), predict_logits(ramp, sym).flip(-1))


def test_multi_scale_shapes_and_average():
    model = StridedModel().eval()
    x = images(b=2, h=32, w=48)
    probs = predict_logits(model, x, scales=(0.5, 1.0, 1.5), flip=True)
    assert probs.shape == (2, 5, 32, 48)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 32, 48))
    probs = predict_logits(model, x, scales=(0.75, 1.25), output_size=(64, 96), mode="slide", crop=16)
    assert probs.shape == (2, 5, 64, 96)
    # the average of the per-scale results
    per_scale = [
        predict_logits(model, F.interpolate(x, scale_factor=s, mode="bilinear"), output_size=(32, 48))
        for s in (0.5, 2.0)
    ]
    torch.testing.assert_close(predict_logits(model, x, scales=(0.5, 2.0)), (per_scale[0] + per_scale[1]) / 2)


def test_amp_uint8_and_bad_arguments():
    model = PixelModel().eval()
    x = images()
    ref = predict_logits(model, x)
    torch.testing.assert_close(predict_logits(model, x, amp="bf16"), ref, atol=0.05, rtol=0)
    u8 = (x * 255).round().to(torch.uint8)
    torch.testing.assert_close(predict_logits(model, u8), predict_logits(model, u8.float() / 255))
    with pytest.raises(ValueError, match="crop"):
        predict_logits(model, x, mode="slide")
    with pytest.raises(ValueError, match="gaps"):
        predict_logits(model, x, mode="slide", crop=(8, 8), stride=(4, 9))
    with pytest.raises(ValueError, match="mode"):
        predict_logits(model, x, mode="tiles")
    with pytest.raises(ValueError, match="amp"):
        predict_logits(model, x, amp="fp8")
    with pytest.raises(ValueError, match="scales"):
        predict_logits(model, x, scales=())
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        predict_logits(model, x[0])
    with pytest.raises(TypeError, match="logits"):
        predict_logits(lambda t: {"out": t}, x)


# ---------------------------------------------------------------- evaluate()

NUM_CLASSES = 4


class ColourOracle(nn.Module):
    """Predicts class round(R * 255 / 60) from the red channel: images encode their labels."""

    num_classes = NUM_CLASSES

    def forward(self, x):
        centres = torch.arange(NUM_CLASSES, device=x.device).view(1, -1, 1, 1) * 60.0
        return -(x[:, :1] * 255.0 - centres).abs()


def make_sample(cls: int, h: int, w: int, scale: int, name: str) -> dict:
    """An image filled with class ``cls`` and a mask ``scale`` times larger: top half ``cls``, bottom half
    the next class, a row of 255 in the middle, and a column of the class itself."""
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    image[0] = cls * 60
    mask = torch.full((h * scale, w * scale), cls, dtype=torch.uint8)
    mask[h * scale // 2 :] = (cls + 1) % NUM_CLASSES
    mask[h * scale // 2] = 255
    return {"image": image, "mask": mask, "name": name}


def expected_metrics(samples, **kw):
    cm = ConfusionMatrix(NUM_CLASSES)
    for s in samples:
        cm.update(torch.full_like(s["mask"], int(s["image"][0, 0, 0]) // 60, dtype=torch.long), s["mask"])
    return cm.compute(**kw)


def test_evaluate_with_masks_larger_than_images_and_collated_batches():
    samples = [make_sample(c, 6, 8, scale=2, name=f"img{c}") for c in (0, 1, 2, 1, 3)]
    loader = DataLoader(samples, batch_size=2)  # default collate stacks image and mask
    model = ColourOracle()
    model.train()
    m = evaluate(model, loader, device="cpu", num_classes=NUM_CLASSES, class_names=list("abcd"))
    assert model.training  # previous mode restored
    ref = expected_metrics(samples, class_names=list("abcd"))
    assert m.num_images == 5
    assert m.per_class_iou == pytest.approx(ref.per_class_iou)
    assert m.miou == pytest.approx(ref.miou) and m.pixel_accuracy == pytest.approx(ref.pixel_accuracy)
    assert 0 < m.miou < 100


def test_evaluate_list_batches_of_different_sizes_and_tta_options():
    samples = [make_sample(1, 6, 8, 2, "a"), make_sample(2, 10, 4, 3, "b"), make_sample(3, 5, 5, 1, "c")]

    def list_batches():
        for i in range(0, 3, 2):
            chunk = samples[i : i + 2]
            yield {k: [s[k] for s in chunk] for k in ("image", "mask", "name")}

    model = ColourOracle().eval()
    m = evaluate(
        model, list_batches(), device="cpu", num_classes=NUM_CLASSES,
        mode="slide", crop=4, flip=True, scales=(1.0, 2.0), progress=True,
    )
    assert not model.training
    ref = expected_metrics(samples)
    assert m.num_images == 3
    assert m.per_class_iou == pytest.approx(ref.per_class_iou)
    assert m.pixel_accuracy == pytest.approx(ref.pixel_accuracy)


def test_evaluate_errors():
    model = ColourOracle()
    unlabeled = [{"image": torch.zeros(1, 3, 4, 4, dtype=torch.uint8), "name": ["x"]}]
    with pytest.raises(ValueError, match="with_labels=False"):
        evaluate(model, unlabeled, device="cpu", num_classes=NUM_CLASSES)
    assert model.training  # restored even when evaluation fails
    with pytest.raises(ValueError, match="predicts 4 classes"):
        evaluate(model, [], device="cpu", num_classes=19)
    with pytest.raises(ValueError, match="19-class model"):
        evaluate(model, [], device="cpu", num_classes=NUM_CLASSES, protocol=16)
    bad = [{"image": torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "mask": torch.zeros(1, 4, 4, dtype=torch.uint8)}]
    with pytest.raises(ValueError, match="batch\\['mask'\\]"):
        evaluate(model, bad, device="cpu", num_classes=NUM_CLASSES)
