"""Lightweight students: torchvision LR-ASPP and DeepLabV3 on MobileNetV3-Large.

Both are built with ``weights=None, weights_backbone=None`` (nothing is downloaded) and re-expressed as a
``SegmentationModel`` whose last step is the shared ``Dropout2d + 1x1 conv`` classifier:

* LR-ASPP (output stride 8). torchvision computes ``low_classifier(low) + high_classifier(up(cbr(high) *
  scale(high)))``. The sum of two 1x1 convolutions is one 1x1 convolution over the concatenated inputs, so our
  features are ``concat(low, up(...))`` ``(B, 40 + 128, H/8, W/8)`` and our classifier's weight is
  ``[W_low | W_high]`` with bias ``b_low + b_high`` (exactly torchvision's output when dropout is off).
* DeepLabV3 (output stride 16): features are the DeepLabHead output before its last 1x1 conv
  ``(B, 256, H/16, W/16)``; that conv becomes our classifier.

``weights=`` accepts a torchvision state dict of the full segmentation model (its classifier is reused when
the number of classes matches, re-initialised with a warning otherwise; the auxiliary head is ignored), of the
MobileNetV3-Large ImageNet classifier (the backbone only), or an sfdaseg checkpoint of the same model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from sfdaseg.models.base import (
    Normalization,
    SegmentationModel,
    WeightsError,
    load_state_dict_checked,
    load_weights,
)

logger = logging.getLogger(__name__)


def _backbone_from_imagenet(
    model: SegmentationModel, state_dict: Mapping[str, torch.Tensor], *, source: str | Path
) -> None:
    """Load ``features.N.*`` of a torchvision ``mobilenet_v3_large`` state dict into ``backbone.N.*``.

    The segmentation backbone is the ImageNet model's ``features`` (blocks 0-16, dilated in the last stage,
    which changes no weight); the ImageNet classifier (``classifier.*``) is not used.
    """
    sd = {k[len("features.") :]: v for k, v in state_dict.items() if k.startswith("features.")}
    load_state_dict_checked(
        model.backbone, sd, source=source, expected="a torchvision MobileNetV3-Large ImageNet state dict"
    )
    logger.info("%s: loaded a MobileNetV3-Large ImageNet backbone; the head and classifier start untrained", source)


def _load_classifier(
    model: SegmentationModel, weight: torch.Tensor, bias: torch.Tensor, *, source: str | Path
) -> None:
    if weight.shape[0] != model.num_classes:
        logger.warning(
            "%s: the classifier was re-initialised for num_classes=%d (the file's has %d classes); "
            "the backbone and head were loaded",
            source,
            model.num_classes,
            weight.shape[0],
        )
        return
    model.classifier[1].load_state_dict({"weight": weight, "bias": bias})


def _stride8_block(backbone: nn.Module) -> tuple[nn.Module, int]:
    """The last stride-8 block of a MobileNetV3-Large trunk (torchvision's ``aux`` layer: block 4, 40 channels)."""
    block = backbone._modules["4"]
    return block, int(block.out_channels)


class LRASPPMobileNetV3(SegmentationModel):
    """LR-ASPP MobileNetV3-Large; output stride 8, features ``(B, 168, H/8, W/8)`` (see module docstring)."""

    def __init__(
        self,
        *,
        num_classes: int,
        dropout: float = 0.1,
        normalization: str | Mapping | Normalization = "imagenet",
        aux_head: bool = False,
    ) -> None:
        from torchvision.models.segmentation import lraspp_mobilenet_v3_large

        tv = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes)
        low_channels = tv.classifier.low_classifier.in_channels
        inter_channels = tv.classifier.high_classifier.in_channels
        super().__init__(
            name="lraspp_mobilenet_v3_large",
            num_classes=num_classes,
            feature_dim=low_channels + inter_channels,
            output_stride=8,
            normalization=normalization,
            dropout=dropout,
            build_args={"dropout": dropout},
        )
        self.backbone = tv.backbone  # IntermediateLayerGetter -> {"low": stride 8, "high": stride 16}
        self.cbr = tv.classifier.cbr
        self.scale = tv.classifier.scale
        if aux_head:
            self.enable_aux_head()

    def aux_source(self) -> tuple[nn.Module, int]:
        return _stride8_block(self.backbone)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised ``(B, 3, H, W)`` -> ``(B, 168, H/8, W/8)``."""
        feats = self.backbone(x)
        low, high = feats["low"], feats["high"]  # (B, 40, H/8, W/8), (B, 960, H/16, W/16)
        y = self.cbr(high) * self.scale(high)  # (B, 128, H/16, W/16)
        y = F.interpolate(y, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([low, y], dim=1)

    def load_foreign_state_dict(self, state_dict: Mapping[str, torch.Tensor], *, source: str | Path) -> None:
        if any(k.startswith("features.") for k in state_dict):
            return _backbone_from_imagenet(self, state_dict, source=source)
        if "classifier.low_classifier.weight" not in state_dict:
            if "classifier.1.weight" in state_dict and "cbr.0.weight" in state_dict:
                return self.load_checkpoint_state_dict(state_dict, source=source)
            raise WeightsError(
                f"{source}: expected a torchvision lraspp_mobilenet_v3_large state dict (classifier.cbr..., "
                "classifier.low_classifier...), a mobilenet_v3_large ImageNet state dict (features...) or an "
                f"sfdaseg checkpoint of this model; found keys like {list(state_dict)[:5]}"
            )
        body = {}
        for k, v in state_dict.items():
            if k.startswith("backbone."):
                body[k] = v
            elif k.startswith(("classifier.cbr.", "classifier.scale.")):
                body[k[len("classifier.") :]] = v
        load_state_dict_checked(
            self,
            body,
            source=source,
            expected="a torchvision lraspp_mobilenet_v3_large state dict",
            skip_prefixes=("classifier.",),
        )
        weight = torch.cat([state_dict["classifier.low_classifier.weight"],
                            state_dict["classifier.high_classifier.weight"]], dim=1)
        bias = state_dict["classifier.low_classifier.bias"] + state_dict["classifier.high_classifier.bias"]
        _load_classifier(self, weight, bias, source=source)


class DeepLabV3MobileNetV3(SegmentationModel):
    """DeepLabV3 MobileNetV3-Large; output stride 16, features ``(B, 256, H/16, W/16)``."""

    def __init__(
        self,
        *,
        num_classes: int,
        dropout: float = 0.1,
        normalization: str | Mapping | Normalization = "imagenet",
        aux_head: bool = False,
    ) -> None:
        from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

        tv = deeplabv3_mobilenet_v3_large(
            weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False
        )
        feature_dim = tv.classifier[4].in_channels
        super().__init__(
            name="deeplabv3_mobilenet_v3_large",
            num_classes=num_classes,
            feature_dim=feature_dim,
            output_stride=16,
            normalization=normalization,
            dropout=dropout,
            build_args={"dropout": dropout},
        )
        self.backbone = tv.backbone  # IntermediateLayerGetter -> {"out": stride 16}
        # ASPP (with its own Dropout(0.5)), 3x3 conv, BN, ReLU: the DeepLabHead without its last 1x1 conv.
        self.head = nn.Sequential(*list(tv.classifier.children())[:4])
        if aux_head:
            self.enable_aux_head()

    def aux_source(self) -> tuple[nn.Module, int]:
        return _stride8_block(self.backbone)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised ``(B, 3, H, W)`` -> ``(B, 256, H/16, W/16)``.

        The ASPP pooling branch has a BatchNorm on a 1x1 map: training needs a batch of at least 2.
        """
        return self.head(self.backbone(x)["out"])

    def load_foreign_state_dict(self, state_dict: Mapping[str, torch.Tensor], *, source: str | Path) -> None:
        if any(k.startswith("features.") for k in state_dict):
            return _backbone_from_imagenet(self, state_dict, source=source)
        if "classifier.4.weight" not in state_dict:
            if "classifier.1.weight" in state_dict and any(k.startswith("head.") for k in state_dict):
                return self.load_checkpoint_state_dict(state_dict, source=source)
            raise WeightsError(
                f"{source}: expected a torchvision deeplabv3_mobilenet_v3_large state dict (backbone..., "
                "classifier.0...classifier.4), a mobilenet_v3_large ImageNet state dict (features...) or an "
                f"sfdaseg checkpoint of this model; found keys like {list(state_dict)[:5]}"
            )
        body = {}
        for k, v in state_dict.items():
            if k.startswith("backbone."):
                body[k] = v
            elif k.startswith(("classifier.0.", "classifier.1.", "classifier.2.")):
                body["head." + k[len("classifier.") :]] = v
            # aux_classifier.* (FCN auxiliary head of the torchvision training recipe) is not part of our model
        load_state_dict_checked(
            self,
            body,
            source=source,
            expected="a torchvision deeplabv3_mobilenet_v3_large state dict",
            skip_prefixes=("classifier.",),
        )
        _load_classifier(self, state_dict["classifier.4.weight"], state_dict["classifier.4.bias"], source=source)


def lraspp_mobilenet_v3_large(
    *,
    num_classes: int,
    weights: str | Path | None = None,
    dropout: float = 0.1,
    normalization: str | Mapping | Normalization = "imagenet",
    aux_head: bool = False,
) -> LRASPPMobileNetV3:
    """LR-ASPP MobileNetV3-Large (output stride 8).

    Args:
        num_classes: ``C``.
        weights: a local torchvision state dict (full LR-ASPP model or MobileNetV3-Large ImageNet backbone)
            or an sfdaseg checkpoint of this model. ``None`` = random initialisation.
        dropout: ``p`` of the classifier's Dropout2d (torchvision's head has none; MC-dropout needs some).
        normalization: input normalisation (ImageNet for torchvision weights).
        aux_head: an auxiliary FCN head on the last stride-8 block (torchvision's ``aux`` layer), for deep
            supervision in source training.
    """
    model = LRASPPMobileNetV3(num_classes=num_classes, dropout=dropout, normalization=normalization, aux_head=aux_head)
    if weights is not None:
        load_weights(model, weights)
    return model


def deeplabv3_mobilenet_v3_large(
    *,
    num_classes: int,
    weights: str | Path | None = None,
    dropout: float = 0.1,
    normalization: str | Mapping | Normalization = "imagenet",
    aux_head: bool = False,
) -> DeepLabV3MobileNetV3:
    """DeepLabV3 MobileNetV3-Large (output stride 16).

    Args:
        num_classes: ``C``.
        weights: a local torchvision state dict (full DeepLabV3 model or MobileNetV3-Large ImageNet backbone)
            or an sfdaseg checkpoint of this model. ``None`` = random initialisation.
        dropout: ``p`` of the classifier's Dropout2d.
        normalization: input normalisation (ImageNet for torchvision weights).
        aux_head: an auxiliary FCN head on the last stride-8 block (torchvision's ``aux`` layer), for deep
            supervision in source training.
    """
    model = DeepLabV3MobileNetV3(num_classes=num_classes, dropout=dropout, normalization=normalization, aux_head=aux_head)
    if weights is not None:
        load_weights(model, weights)
    return model
