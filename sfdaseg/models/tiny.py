"""A small, fast encoder-decoder CNN for tests and the CPU demo (about 0.5 M parameters at ``width=32``).

Encoder (the "backbone"), with ``w = width``::

    stem     3x3 s2            3   -> w/2   (H/2)
    stage4   3x3 s2, 3x3       w/2 -> w     (H/4)    -> skip4
    stage8   3x3 s2, 3x3       w   -> 2w    (H/8)    -> skip8
    stage16  3x3 s2, 3x3 d2    2w  -> 4w    (H/16)

Head: a small ASPP-like context module at H/16 (1x1, 3x3 dilation 2 and 4, image pooling; concat, 1x1),
then two decoder steps that upsample and fuse the skips (H/8, then H/4). Features ``(B, 2w, H/4, W/4)``.
Every conv is conv + BN + ReLU except the image-pooling branch (no BN on a 1x1 map, so batch 1 trains).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from sfdaseg.models.base import Normalization, SegmentationModel, load_weights


NORMS = ("bn", "gn")


def conv_bn_relu(cin: int, cout: int, *, kernel: int = 3, stride: int = 1, dilation: int = 1,
                 norm: str = "bn") -> nn.Sequential:
    padding = dilation * (kernel // 2)
    # GroupNorm ("gn") makes a sample's output independent of the rest of its batch, which lets tests compare
    # gradient accumulation and DDP with one large batch exactly (BatchNorm statistics would differ).
    layer = nn.BatchNorm2d(cout) if norm == "bn" else nn.GroupNorm(min(8, cout), cout)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, bias=False),
        layer,
        nn.ReLU(inplace=True),
    )


class TinyEncoder(nn.Module):
    def __init__(self, width: int, norm: str = "bn") -> None:
        super().__init__()
        w, n = width, norm
        self.stem = conv_bn_relu(3, w // 2, stride=2, norm=n)
        self.stage4 = nn.Sequential(conv_bn_relu(w // 2, w, stride=2, norm=n), conv_bn_relu(w, w, norm=n))
        self.stage8 = nn.Sequential(conv_bn_relu(w, 2 * w, stride=2, norm=n), conv_bn_relu(2 * w, 2 * w, norm=n))
        self.stage16 = nn.Sequential(conv_bn_relu(2 * w, 4 * w, stride=2, norm=n),
                                     conv_bn_relu(4 * w, 4 * w, dilation=2, norm=n))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, 3, H, W)`` -> ``(B, w, H/4, W/4)``, ``(B, 2w, H/8, W/8)``, ``(B, 4w, H/16, W/16)``."""
        s4 = self.stage4(self.stem(x))
        s8 = self.stage8(s4)
        return s4, s8, self.stage16(s8)


class TinyContext(nn.Module):
    """Multi-rate context at stride 16: ``(B, 4w, h, w) -> (B, 2w, h, w)``."""

    def __init__(self, cin: int, branch: int, cout: int, norm: str = "bn") -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [
                conv_bn_relu(cin, branch, kernel=1, norm=norm),
                conv_bn_relu(cin, branch, dilation=2, norm=norm),
                conv_bn_relu(cin, branch, dilation=4, norm=norm),
            ]
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, branch, 1), nn.ReLU(inplace=True))
        self.fuse = conv_bn_relu(4 * branch, cout, kernel=1, norm=norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(x).expand(-1, -1, x.shape[2], x.shape[3])  # image-level context, broadcast
        return self.fuse(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class TinySegNet(SegmentationModel):
    """See the module docstring. Output stride 4, ``feature_dim = 2 * width``."""

    def __init__(
        self,
        *,
        num_classes: int,
        width: int = 32,
        dropout: float = 0.1,
        norm: str = "bn",
        normalization: str | Mapping | Normalization = "imagenet",
        aux_head: bool = False,
    ) -> None:
        if width < 2 or width % 2:
            raise ValueError(f"tiny: width must be an even integer >= 2, got {width}")
        if norm not in NORMS:
            raise ValueError(f"tiny: norm must be one of {', '.join(NORMS)}, got {norm!r}")
        super().__init__(
            name="tiny",
            num_classes=num_classes,
            feature_dim=2 * width,
            output_stride=4,
            normalization=normalization,
            dropout=dropout,
            build_args={"width": width, "dropout": dropout, "norm": norm},
        )
        w = width
        self.backbone = TinyEncoder(w, norm)
        self.context = TinyContext(4 * w, w, 2 * w, norm)
        self.fuse8 = conv_bn_relu(2 * w + 2 * w, 2 * w, norm=norm)
        self.fuse4 = conv_bn_relu(2 * w + w, 2 * w, norm=norm)
        if aux_head:
            self.enable_aux_head()

    def aux_source(self) -> tuple[nn.Module, int]:
        return self.backbone.stage8, self.feature_dim  # stride 8, 2w channels (= feature_dim)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised ``(B, 3, H, W)`` -> ``(B, 2w, H/4, W/4)``."""
        s4, s8, s16 = self.backbone(x)
        y = self.context(s16)  # (B, 2w, H/16, W/16)
        y = F.interpolate(y, size=s8.shape[-2:], mode="bilinear", align_corners=False)
        y = self.fuse8(torch.cat([y, s8], dim=1))  # (B, 2w, H/8, W/8)
        y = F.interpolate(y, size=s4.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse4(torch.cat([y, s4], dim=1))  # (B, 2w, H/4, W/4)


def tiny(
    *,
    num_classes: int,
    weights: str | Path | None = None,
    width: int = 32,
    dropout: float = 0.1,
    norm: str = "bn",
    normalization: str | Mapping | Normalization = "imagenet",
    aux_head: bool = False,
) -> TinySegNet:
    """The tiny CNN (tests, CPU demo).

    Args:
        num_classes: ``C``.
        weights: an sfdaseg checkpoint of this model or a state dict file with its keys; ``None`` = random.
        width: base channel count ``w`` (features have ``2w`` channels).
        dropout: ``p`` of the classifier's Dropout2d.
        norm: ``"bn"`` (BatchNorm, default) or ``"gn"`` (GroupNorm: batch-independent, for exactness tests).
        normalization: input normalisation.
        aux_head: an auxiliary FCN head on the stride-8 stage (deep supervision in source training).
    """
    model = TinySegNet(num_classes=num_classes, width=width, dropout=dropout, norm=norm,
                       normalization=normalization, aux_head=aux_head)
    if weights is not None:
        load_weights(model, weights)
    return model
