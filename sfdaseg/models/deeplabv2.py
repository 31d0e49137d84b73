"""DeepLabV2 with a ResNet-101 backbone (output stride 8), the classic SFDA / UDA baseline model.

Backbone: torchvision ``resnet101`` with ``replace_stride_with_dilation=[False, True, True]`` (layer3 and
layer4 dilated by 2 and 4, output stride 8), without its pooling and fc layers.

Head: the DeepLabV2 ASPP, four parallel 3x3 convolutions on the 2048-channel ``layer4`` output with dilations
6 / 12 / 18 / 24. The original DeepLabV2 branches output class scores directly and are summed. Ours (a design
choice of this library, so that MC-dropout and prototypes have features before the final classifier) output
``feature_dim`` channels (256 by default); they are summed and passed through a ReLU, and the shared classifier
``Dropout2d(0.1) + Conv2d(feature_dim, C, 1)`` maps them to logits.
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

ASPP_DILATIONS = (6, 12, 18, 24)


class ResNetBackbone(nn.Module):
    """The convolutional trunk of a torchvision ResNet; parameter names are those of torchvision."""

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(resnet, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` -> ``(B, 2048, H/8, W/8)`` (with the dilated layer3 / layer4)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class ASPPSum(nn.Module):
    """DeepLabV2 ASPP: parallel dilated 3x3 convolutions, summed (no BN, as in the original)."""

    def __init__(self, in_channels: int, out_channels: int, dilations: tuple[int, ...] = ASPP_DILATIONS) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, out_channels, 3, padding=d, dilation=d, bias=True) for d in dilations
        )
        for conv in self.branches:
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, Cin, h, w)`` -> ``(B, Cout, h, w)``."""
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return F.relu(out)


class DeepLabV2(SegmentationModel):
    """DeepLabV2-ResNet101 (see the module docstring). Output stride 8.

    ``freeze_bn=True`` keeps the backbone's BatchNorm layers in eval mode with frozen affine parameters, the
    usual DeepLabV2 practice with the small batches of segmentation training.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        feature_dim: int = 256,
        dropout: float = 0.1,
        normalization: str | Mapping | Normalization = "imagenet",
        freeze_bn: bool = False,
    ) -> None:
        from torchvision.models import resnet101

        super().__init__(
            name="deeplabv2_r101",
            num_classes=num_classes,
            feature_dim=feature_dim,
            output_stride=8,
            normalization=normalization,
            dropout=dropout,
            build_args={"feature_dim": feature_dim, "dropout": dropout, "freeze_bn": freeze_bn},
        )
        self.backbone = ResNetBackbone(
            resnet101(weights=None, replace_stride_with_dilation=[False, True, True])
        )
        self.aspp = ASPPSum(2048, feature_dim)
        self.freeze_bn = bool(freeze_bn)
        if self.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.requires_grad_(False)

    def train(self, mode: bool = True) -> "DeepLabV2":
        super().train(mode)
        if self.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised ``(B, 3, H, W)`` -> ``(B, feature_dim, H/8, W/8)``."""
        return self.aspp(self.backbone(x))

    def aux_source(self) -> tuple[nn.Module, int]:
        return self.backbone.layer3, 1024

    def load_foreign_state_dict(self, state_dict: Mapping[str, torch.Tensor], *, source: str | Path) -> None:
        """A torchvision ResNet-101 ImageNet state dict (``conv1.weight``, ``layer1...``; ``fc.*`` ignored)."""
        if not any(k.startswith("layer4.") for k in state_dict):
            if any(k.startswith("backbone.") for k in state_dict):
                return self.load_checkpoint_state_dict(state_dict, source=source)
            raise WeightsError(
                f"{source}: expected a torchvision ResNet-101 state dict (keys conv1.weight, layer1.0..., "
                f"layer4...) or an sfdaseg deeplabv2_r101 checkpoint; found keys like {list(state_dict)[:5]}"
            )
        backbone_sd = {k: v for k, v in state_dict.items() if not k.startswith("fc.")}
        load_state_dict_checked(
            self.backbone, backbone_sd, source=source, expected="a torchvision ResNet-101 state dict"
        )
        logger.info("%s: loaded a ResNet-101 backbone; the ASPP head and classifier start untrained", source)


def deeplabv2_r101(
    *,
    num_classes: int,
    weights: str | Path | None = None,
    feature_dim: int = 256,
    dropout: float = 0.1,
    normalization: str | Mapping | Normalization = "imagenet",
    freeze_bn: bool = False,
    aux_head: bool = False,
) -> DeepLabV2:
    """DeepLabV2-ResNet101, output stride 8.

    Args:
        num_classes: ``C``.
        weights: local file: a torchvision ResNet-101 ImageNet state dict, or an sfdaseg checkpoint of this
            model. ``None`` = random initialisation.
        feature_dim: channels of the ASPP branches, i.e. the classifier input ``D`` (our design, see module).
        dropout: ``p`` of the classifier's Dropout2d.
        normalization: ``"imagenet"`` (torchvision weights) or ``"caffe"`` (BGR, mean only: Caffe weights).
        freeze_bn: keep backbone BatchNorm statistics and affine parameters fixed.
        aux_head: an auxiliary FCN head on ``layer3`` (1024 channels, stride 8; mmsegmentation's DeepLab configs,
            loss weight 0.4), for deep supervision in source training.
    """
    model = DeepLabV2(
        num_classes=num_classes,
        feature_dim=feature_dim,
        dropout=dropout,
        normalization=normalization,
        freeze_bn=freeze_bn,
    )
    if aux_head:
        model.enable_aux_head()
    if weights is not None:
        load_weights(model, weights)
    return model
