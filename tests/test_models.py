"""Models: shapes, the extract/classify contract, parameter groups, normalisation, weights loading.

Everything runs on the CPU at 64x128. The large models (DeepLabV2-R101, SegFormer-B2..B5) are built at most
once (module-scoped cache) or only in tests marked slow.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from sfdaseg.data.classes import ClassSpec
from sfdaseg.models import load_model, save_model
from sfdaseg.models import CAFFE, IMAGENET, MODELS, Normalization, SegmentationModel, WeightsError, build_model
from sfdaseg.models.segformer import VARIANTS

NUM_CLASSES = 5
H, W = 64, 128
FAST = ["deeplabv2_r101", "segformer_b0", "segformer_b1", "lraspp_mobilenet_v3_large",
        "deeplabv3_mobilenet_v3_large", "tiny"]
BIG_SEGFORMERS = ["segformer_b2", "segformer_b3", "segformer_b4", "segformer_b5"]


@pytest.fixture(scope="module")
def models():
    """name -> model with NUM_CLASSES outputs, built on first use (seeded, so runs are reproducible)."""
    cache: dict[str, SegmentationModel] = {}

    def get(name: str) -> SegmentationModel:
        if name not in cache:
            torch.manual_seed(0)
            cache[name] = build_model(name, num_classes=NUM_CLASSES)
        return cache[name]

    return get


@pytest.fixture
def x():
    return torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(1))


def _randomize_bn(model: nn.Module) -> None:
    """Non-trivial BN statistics, so that a lost buffer would change the outputs."""
    g = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def test_registry_lists_every_model():
    assert set(MODELS) == set(FAST) | set(BIG_SEGFORMERS)


@pytest.mark.parametrize("name", FAST)
def test_shapes_and_extract_classify_contract(models, x, name):
    model = models(name).eval()
    s = model.output_stride
    with torch.no_grad():
        logits = model(x)
        logits2, features = model(x, return_features=True)
        recomposed = model.classify(model.extract(x))
    assert logits.shape == (2, NUM_CLASSES, H // s, W // s)
    assert features.shape == (2, model.feature_dim, H // s, W // s)
    torch.testing.assert_close(logits2, logits)
    torch.testing.assert_close(recomposed, logits)
    assert model.num_classes == NUM_CLASSES and model.name == name


@pytest.mark.parametrize("name", FAST)
def test_classifier_is_dropout2d_then_1x1_conv(models, name):
    model = models(name)
    dropout, conv = model.classifier
    assert isinstance(model.classifier, nn.Sequential) and len(model.classifier) == 2
    assert isinstance(dropout, nn.Dropout2d) and 0.0 < dropout.p < 1.0
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1)
    assert (conv.in_channels, conv.out_channels) == (model.feature_dim, NUM_CLASSES)


@pytest.mark.parametrize("name", FAST)
def test_param_groups_cover_every_parameter_once(models, name):
    model = models(name)
    groups = model.param_groups()
    assert set(groups) == {"backbone", "head"}
    assert groups["backbone"] and groups["head"]
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    head_ids = {id(p) for p in groups["head"]}
    assert all(id(p) in head_ids for p in model.classifier.parameters())


@pytest.mark.parametrize("name", FAST)
def test_build_args_rebuild_the_architecture(models, name):
    model = models(name)
    assert model.build_args["num_classes"] == NUM_CLASSES
    rebuilt = build_model(name, **model.build_args)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    # Normalisation buffers are not persistent: they stay out of the state dict.
    assert not any("norm_scale" in k or "norm_shift" in k for k in model.state_dict())


def test_normalization_is_applied_inside_extract(x):
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=3).eval()
    mean = torch.tensor(IMAGENET.mean).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET.std).view(1, 3, 1, 1)
    manual = (x * 255 - mean) / std
    torch.testing.assert_close(model.normalize(x), manual)
    with torch.no_grad():
        torch.testing.assert_close(model.extract(x), model.forward_features(manual))
        assert not torch.allclose(model.extract(x), model.forward_features(x))


def test_caffe_normalization_flips_to_bgr(x):
    model = build_model("tiny", num_classes=3, normalization="caffe")
    assert model.normalization == CAFFE and model.build_args["normalization"] == "caffe"
    bgr = x.flip(1) * 255 - torch.tensor(CAFFE.mean).view(1, 3, 1, 1)
    torch.testing.assert_close(model.normalize(x), bgr)


def test_normalization_presets_and_dict_round_trip():
    assert IMAGENET.mean == (123.675, 116.28, 103.53) and IMAGENET.std == (58.395, 57.12, 57.375)
    assert CAFFE.mean == (104.008, 116.669, 122.679) and CAFFE.std == (1.0, 1.0, 1.0) and CAFFE.bgr
    custom = Normalization(mean=(1, 2, 3), std=(4, 5, 6))
    assert Normalization.from_dict(custom.to_dict()) == custom
    model = build_model("tiny", num_classes=2, normalization=custom.to_dict())
    assert model.normalization == custom and model.build_args["normalization"] == custom.to_dict()
    with pytest.raises(ValueError, match="unknown preset 'imagnet'"):
        Normalization.resolve("imagnet")


def test_uint8_input_is_rejected_with_a_hint():
    model = build_model("tiny", num_classes=2)
    with pytest.raises(TypeError, match="to_model_input"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_normalization_follows_the_device_and_dtype():
    model = build_model("tiny", num_classes=2).to(torch.float64)
    out = model.normalize(torch.rand(1, 3, 8, 8, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_reset_classifier_resizes_and_keeps_dropout():
    model = build_model("tiny", num_classes=4, dropout=0.3)
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model.reset_classifier(7)
    assert model.num_classes == 7 and model.build_args["num_classes"] == 7
    assert model.classifier[1].out_channels == 7 and model.classifier[0].p == 0.3
    assert model.eval()(torch.rand(1, 3, 32, 32)).shape == (1, 7, 8, 8)
    for k, v in model.backbone.state_dict().items():
        torch.testing.assert_close(v, backbone_before[k])


def test_mc_dropout_samples_only_the_classifier(x):
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=3, dropout=0.5).eval()
    with torch.no_grad():
        features = model.extract(x)
        model.classifier.train()
        a, b = model.classify(features), model.classify(features)
    assert not torch.allclose(a, b)


def test_tiny_is_small_and_has_a_width_option():
    n = sum(p.numel() for p in build_model("tiny", num_classes=19).parameters())
    assert 200_000 <= n <= 1_000_000
    narrow = build_model("tiny", num_classes=19, width=16)
    assert narrow.feature_dim == 32
    assert sum(p.numel() for p in narrow.parameters()) < n


@pytest.mark.parametrize("name", ["tiny", "lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large",
                                  "segformer_b0", "deeplabv2_r101"])
def test_save_load_round_trip_gives_identical_outputs(models, x, tmp_path, name):
    model = models(name)
    with torch.no_grad():
        _randomize_bn(model)
    classes = ClassSpec(names=tuple(f"c{i}" for i in range(NUM_CLASSES)))
    path = save_model(tmp_path / f"{name}.pt", model, classes=classes)
    loaded, info = load_model(path)
    assert info.name == name and not loaded.training
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


# -- errors ------------------------------------------------------------------------------------------------


def test_unknown_model_suggests_a_close_name():
    with pytest.raises(ValueError, match=r"unknown model 'segformer_b6'.*did you mean 'segformer_b\d'"):
        build_model("segformer_b6", num_classes=3)
    with pytest.raises(ValueError, match="choices: deeplabv2_r101"):
        build_model("resnet", num_classes=3)


def test_unknown_option_lists_the_options():
    with pytest.raises(ValueError, match=r"model 'tiny' has no option\(s\) \['depth'\].*width=32"):
        build_model("tiny", num_classes=3, depth=4)


def test_missing_weights_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        build_model("tiny", num_classes=3, weights=tmp_path / "nope.pt")


def test_weights_of_another_architecture_are_rejected(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(build_model("tiny", num_classes=3).state_dict(), path)
    with pytest.raises(WeightsError, match=r"tiny\.pt.*lraspp_mobilenet_v3_large"):
        build_model("lraspp_mobilenet_v3_large", num_classes=3, weights=path)
    mismatch = r"tiny\.pt.*Shape mismatches: .*file \(3, 64, 1, 1\) vs model \(3, 32, 1, 1\)"
    with pytest.raises(WeightsError, match=mismatch):
        build_model("tiny", num_classes=3, width=16, weights=path)


def test_plain_state_dict_of_the_same_model_loads(tmp_path):
    src = build_model("tiny", num_classes=3)
    path = tmp_path / "tiny_sd.pt"
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}, path)
    model = build_model("tiny", num_classes=3, weights=path)
    for k, v in src.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)


def test_a_folder_is_rejected_for_non_segformer_models(tmp_path):
    with pytest.raises(WeightsError, match="only segformer_"):
        build_model("tiny", num_classes=3, weights=tmp_path)


# -- DeepLabV2 -------------------------------------------------------------------------------------------------


def test_deeplabv2_loads_a_torchvision_resnet101_state_dict(models, tmp_path):
    from torchvision.models import resnet101

    torch.manual_seed(3)
    sd = resnet101(weights=None).state_dict()
    path = tmp_path / "resnet101.pth"
    torch.save(sd, path)
    model = build_model("deeplabv2_r101", num_classes=NUM_CLASSES, weights=path, freeze_bn=True)
    own = model.backbone.state_dict()
    assert set(own) == {k for k in sd if not k.startswith("fc.")}
    for k in ("conv1.weight", "layer3.22.conv2.weight", "layer4.2.bn3.running_var"):
        torch.testing.assert_close(own[k], sd[k])
    # The dilated trunk: output stride 8 instead of 32.
    assert model.output_stride == 8 and model.backbone.layer4[1].conv2.dilation == (4, 4)
    # freeze_bn: backbone BN layers stay in eval mode with frozen affine parameters; the head trains.
    model.train()
    bns = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert not any(p.requires_grad for m in bns for p in m.parameters())
    assert model.aspp.training and model.classifier.training and model.build_args["freeze_bn"] is True

    sd["layer4.0.conv1.weight"] = sd["layer4.0.conv1.weight"][:, :100]
    torch.save(sd, path)
    with pytest.raises(WeightsError, match=r"resnet101\.pth.*layer4\.0\.conv1\.weight: file \(512, 100, 1, 1\)"):
        build_model("deeplabv2_r101", num_classes=NUM_CLASSES, weights=path)


# -- MobileNetV3 students ----------------------------------------------------------------------------------


def test_lraspp_matches_torchvision_outputs(tmp_path, x):
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    torch.manual_seed(4)
    tv = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=NUM_CLASSES)
    with torch.no_grad():
        _randomize_bn(tv)
        tv.classifier.low_classifier.bias.normal_()
        tv.classifier.high_classifier.bias.normal_()
    path = tmp_path / "lraspp.pth"
    torch.save(tv.state_dict(), path)
    model = build_model("lraspp_mobilenet_v3_large", num_classes=NUM_CLASSES, weights=path).eval()
    tv.eval()
    with torch.no_grad():
        ours = nn.functional.interpolate(model(x), size=(H, W), mode="bilinear", align_corners=False)
        ref = tv(model.normalize(x))["out"]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_lraspp_with_other_classes_reinitialises_the_classifier(tmp_path, caplog):
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    tv = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21)
    path = tmp_path / "lraspp_voc.pth"
    torch.save(tv.state_dict(), path)
    with caplog.at_level(logging.WARNING, logger="sfdaseg.models"):
        model = build_model("lraspp_mobilenet_v3_large", num_classes=NUM_CLASSES, weights=path)
    assert "re-initialised for num_classes=5" in caplog.text and "lraspp_voc.pth" in caplog.text
    torch.testing.assert_close(model.cbr[0].weight, tv.classifier.cbr[0].weight)


def test_deeplabv3_mobilenet_matches_torchvision_outputs(tmp_path, x):
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    torch.manual_seed(5)
    tv = deeplabv3_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=NUM_CLASSES, aux_loss=True
    )
    with torch.no_grad():
        _randomize_bn(tv)
    path = tmp_path / "deeplabv3_mnv3.pth"
    torch.save(tv.state_dict(), path)  # with the aux head, as the torchvision recipe saves it
    model = build_model("deeplabv3_mobilenet_v3_large", num_classes=NUM_CLASSES, weights=path).eval()
    tv.eval()
    with torch.no_grad():
        ours = nn.functional.interpolate(model(x), size=(H, W), mode="bilinear", align_corners=False)
        ref = tv(model.normalize(x))["out"]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_mobilenet_imagenet_backbone_loads(tmp_path):
    from torchvision.models import mobilenet_v3_large

    torch.manual_seed(6)
    sd = mobilenet_v3_large(weights=None).state_dict()
    path = tmp_path / "mobilenet_v3_large.pth"
    torch.save(sd, path)
    for name in ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"):
        model = build_model(name, num_classes=3, weights=path)
        torch.testing.assert_close(model.backbone.state_dict()["16.0.weight"], sd["features.16.0.weight"])
        torch.testing.assert_close(model.backbone.state_dict()["4.block.0.0.weight"], sd["features.4.block.0.0.weight"])


# -- SegFormer ------------------------------------------------------------------------------------------------


def test_segformer_variant_table():
    """MiT sizes as in the paper / nvidia/mit-b* configs; decoder 256 for B0/B1 and 768 for B2-B5."""
    expected = {
        "b0": ([32, 64, 160, 256], [2, 2, 2, 2], 256),
        "b1": ([64, 128, 320, 512], [2, 2, 2, 2], 256),
        "b2": ([64, 128, 320, 512], [3, 4, 6, 3], 768),
        "b3": ([64, 128, 320, 512], [3, 4, 18, 3], 768),
        "b4": ([64, 128, 320, 512], [3, 8, 27, 3], 768),
        "b5": ([64, 128, 320, 512], [3, 6, 40, 3], 768),
    }
    for variant, (hidden, depths, decoder) in expected.items():
        arch = VARIANTS[variant]
        assert (arch["hidden_sizes"], arch["depths"], arch["decoder_hidden_size"]) == (hidden, depths, decoder)
        assert arch["num_attention_heads"] == [1, 2, 5, 8] and arch["sr_ratios"] == [8, 4, 2, 1]


@pytest.fixture(scope="module")
def hf_b0_folder(tmp_path_factory):
    """A SegformerForSemanticSegmentation with B0 sizes and 7 labels, saved as a Hugging Face folder."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    arch = VARIANTS["b0"]
    torch.manual_seed(7)
    hf = SegformerForSemanticSegmentation(SegformerConfig(**arch, num_labels=7)).eval()
    with torch.no_grad():
        _randomize_bn(hf)
        hf.decode_head.classifier.bias.normal_()
    folder = tmp_path_factory.mktemp("hf_segformer_b0")
    hf.save_pretrained(folder)
    return folder, hf


def test_segformer_loads_a_hf_folder_and_matches_its_logits(hf_b0_folder, x):
    folder, hf = hf_b0_folder
    model = build_model("segformer_b0", num_classes=7, weights=folder).eval()
    with torch.no_grad():
        ref = hf(pixel_values=model.normalize(x)).logits
        ours, features = model(x, return_features=True)
    assert ours.shape == (2, 7, H // 4, W // 4) and features.shape == (2, 256, H // 4, W // 4)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_segformer_hf_folder_with_other_classes_resizes_the_classifier(hf_b0_folder, caplog, x):
    folder, hf = hf_b0_folder
    with caplog.at_level(logging.WARNING, logger="sfdaseg.models"):
        model = build_model("segformer_b0", num_classes=3, weights=folder).eval()
    assert "classifier was re-initialised for num_classes=3" in caplog.text
    assert model.classifier[1].weight.shape == (3, 256, 1, 1)
    torch.testing.assert_close(model.decode_head.linear_fuse.weight, hf.decode_head.linear_fuse.weight)
    with torch.no_grad():
        assert model(x).shape == (2, 3, H // 4, W // 4)


@pytest.mark.parametrize("kind", ["SegformerModel", "SegformerForImageClassification"])
def test_segformer_loads_an_encoder_only_folder(tmp_path, caplog, kind):
    import transformers

    torch.manual_seed(8)
    cls = getattr(transformers, kind)
    encoder_model = cls(transformers.SegformerConfig(**VARIANTS["b0"], num_labels=10))
    encoder_model.save_pretrained(tmp_path)
    encoder = encoder_model if kind == "SegformerModel" else encoder_model.segformer
    with caplog.at_level(logging.WARNING, logger="sfdaseg.models"):
        model = build_model("segformer_b0", num_classes=4, weights=tmp_path)
    assert "holds only an encoder" in caplog.text
    for k, v in encoder.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[k], v)


def test_segformer_folder_of_another_size_suggests_the_right_variant(tmp_path):
    from transformers import SegformerConfig

    SegformerConfig(**VARIANTS["b1"]).save_pretrained(tmp_path)  # the config is checked before any weight
    with pytest.raises(WeightsError, match=r"not a MiT-B0 .*hidden_sizes.*use model segformer_b1"):
        build_model("segformer_b0", num_classes=3, weights=tmp_path)


def test_segformer_rejects_a_folder_of_another_model_type(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(WeightsError, match="'bert' model, expected a 'segformer'"):
        build_model("segformer_b0", num_classes=3, weights=tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsError, match="no config.json"):
        build_model("segformer_b0", num_classes=3, weights=empty)


def test_segformer_checkpoints_use_the_classic_key_layout(models, tmp_path):
    model = models("segformer_b0")
    keys = set(model.checkpoint_state_dict())
    assert "backbone.encoder.block.0.0.attention.self.query.weight" in keys
    assert "backbone.encoder.patch_embeddings.3.layer_norm.bias" in keys
    assert "backbone.encoder.layer_norm.2.weight" in keys
    assert "decode_head.linear_c.1.proj.weight" in keys and "classifier.1.weight" in keys
    assert len(keys) == len(model.state_dict())
    # Either layout loads back.
    model.load_checkpoint_state_dict(model.state_dict(), source="live")
    model.load_checkpoint_state_dict(model.checkpoint_state_dict(), source="classic")


@pytest.mark.slow
@pytest.mark.parametrize("name", BIG_SEGFORMERS)
def test_big_segformers_shapes(name, x):
    model = build_model(name, num_classes=NUM_CLASSES).eval()
    with torch.no_grad():
        logits, features = model(x, return_features=True)
    assert logits.shape == (2, NUM_CLASSES, H // 4, W // 4)
    assert features.shape == (2, 768, H // 4, W // 4)
