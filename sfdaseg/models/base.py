"""The common base of every segmentation model, and checked weight loading.

A :class:`SegmentationModel` maps float RGB images in ``[0, 1]`` to logits at ``1 / output_stride`` of the
input size and, on request, to the features its final classifier consumes::

    x (B, 3, H, W) --normalize--> backbone + head --> features (B, D, H/s, W/s)
      --classifier = Dropout2d(p) + Conv2d(D, C, 1)--> logits (B, C, H/s, W/s)

The split between ``extract`` and ``classify`` is what MC-dropout and prototype-based methods need: they
sample or inspect only the last, cheap step. Nothing here upsamples to the input size: callers do it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from sfdaseg.normalization import CAFFE, IMAGENET, NORMALIZATIONS, Normalization
from sfdaseg.storage import CheckpointInfo, is_sfdaseg_checkpoint, safe_load, unwrap_state_dict

logger = logging.getLogger(__name__)

__all__ = [
    "CAFFE", "IMAGENET", "NORMALIZATIONS", "Normalization", "SegmentationModel", "WeightsError",
    "check_num_classes", "load_state_dict_checked", "load_weights", "load_weights_from", "make_classifier",
    "unwrap_model",
]


class WeightsError(ValueError):
    """Weights that do not fit the model: wrong architecture, wrong number of classes, unknown file layout."""


# --------------------------------------------------------------------------------------------------------------
# The model base class
# --------------------------------------------------------------------------------------------------------------


def make_classifier(feature_dim: int, num_classes: int, dropout: float) -> nn.Sequential:
    """``Dropout2d(p) + Conv2d(D, C, 1)``; the weight starts small (N(0, 0.01)) as in DeepLab and mmseg heads."""
    if num_classes < 1:
        raise ValueError(f"num_classes: expected a positive integer, got {num_classes}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
    conv = nn.Conv2d(feature_dim, num_classes, kernel_size=1)
    nn.init.normal_(conv.weight, mean=0.0, std=0.01)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(nn.Dropout2d(p=dropout), conv)


class SegmentationModel(nn.Module):
    """Base class: normalisation, the ``extract`` / ``classify`` split, parameter groups, checkpoint hooks.

    Subclasses set ``self.backbone`` (the part that gets the backbone learning rate) and implement
    :meth:`forward_features` on *normalised* input. Everything that is not in ``self.backbone`` is "head".

    Attributes:
        name: registry name (``build_model(name, **build_args)`` rebuilds the architecture).
        num_classes: ``C``, the classifier's output channels.
        feature_dim: ``D``, the classifier's input channels.
        output_stride: ``s``; logits and features are ``(H/s, W/s)`` (rounded up for odd sizes).
        build_args: plain keyword arguments of the builder, ``num_classes`` included.
        normalization: the :class:`Normalization` applied inside :meth:`extract`.
        classifier: ``nn.Sequential(nn.Dropout2d(p), nn.Conv2d(D, C, 1))``.
    """

    backbone: nn.Module

    def __init__(
        self,
        *,
        name: str,
        num_classes: int,
        feature_dim: int,
        output_stride: int,
        normalization: str | Mapping | Normalization,
        dropout: float,
        build_args: Mapping[str, Any],
    ) -> None:
        super().__init__()
        self.name = name
        self.num_classes = int(num_classes)
        self.feature_dim = int(feature_dim)
        self.output_stride = int(output_stride)
        self.build_args = {**dict(build_args), "num_classes": self.num_classes}
        self.classifier = make_classifier(self.feature_dim, self.num_classes, dropout)
        self.aux_head: nn.Module | None = None  # enable_aux_head() adds one (deep supervision)
        self._aux_wanted, self._aux_input = False, None
        # Non-persistent buffers: they follow .to(device) but stay out of state dicts (the checkpoint stores
        # the normalisation as plain metadata instead).
        self.register_buffer("_norm_scale", torch.ones(1, 3, 1, 1), persistent=False)
        self.register_buffer("_norm_shift", torch.zeros(1, 3, 1, 1), persistent=False)
        self.normalization = IMAGENET
        self.set_normalization(normalization)

    # -- normalisation ------------------------------------------------------------------------------------------

    def set_normalization(self, normalization: str | Mapping | Normalization) -> None:
        """Replace the input normalisation (keeps the buffers' device and dtype)."""
        norm = Normalization.resolve(normalization)
        mean = torch.tensor(norm.mean, dtype=torch.float64).view(1, 3, 1, 1)
        std = torch.tensor(norm.std, dtype=torch.float64).view(1, 3, 1, 1)
        # x01 * 255 / std - mean / std == (x01 * 255 - mean) / std, folded into one multiply-add.
        with torch.no_grad():
            self._norm_scale.copy_(255.0 / std)
            self._norm_shift.copy_(-mean / std)
        self.normalization = norm
        self.build_args["normalization"] = norm.to_plain()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """RGB ``[0, 1]`` float ``(B, 3, H, W)`` -> the model's input space (channel flip for BGR models)."""
        if not x.is_floating_point():
            raise TypeError(
                f"{self.name}: expected float RGB input in [0, 1], got dtype {x.dtype}; "
                "convert uint8 batches with sfdaseg.data.transforms.to_model_input"
            )
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.name}: expected input of shape (B, 3, H, W), got {tuple(x.shape)}")
        if self.normalization.bgr:
            x = x.flip(1)
        return x * self._norm_scale + self._norm_shift

    # -- forward --------------------------------------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised input ``(B, 3, H, W)`` -> features ``(B, D, H/s, W/s)``. Implemented by subclasses."""
        raise NotImplementedError

    def extract(self, x: torch.Tensor) -> torch.Tensor:
        """RGB ``[0, 1]`` ``(B, 3, H, W)`` -> features ``(B, D, H/s, W/s)`` (normalisation included)."""
        return self.forward_features(self.normalize(x))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Features ``(B, D, h, w)`` -> logits ``(B, C, h, w)`` (dropout active in train mode only)."""
        return self.classifier(features)

    def forward(
        self, x: torch.Tensor, return_features: bool = False, return_aux: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """RGB ``[0, 1]`` ``(B, 3, H, W)`` -> logits ``(B, C, H/s, W/s)``; ``(logits, features)`` with
        ``return_features``; ``(logits, [features,] aux_logits)`` with ``return_aux`` (the auxiliary head's logits
        at its own stride, training only: see :meth:`enable_aux_head`)."""
        if return_aux and self.aux_head is None:
            raise ValueError(f"{self.name}: return_aux needs the auxiliary head (build the model with aux_head=True)")
        self._aux_wanted = return_aux
        try:
            features = self.extract(x)
        finally:
            self._aux_wanted = False
        logits = self.classify(features)
        if not return_aux:
            return (logits, features) if return_features else logits
        aux, self._aux_input = self.aux_head(self._aux_input), None
        return (logits, features, aux) if return_features else (logits, aux)

    # -- auxiliary (deep-supervision) head ------------------------------------------------------------------------

    def aux_source(self) -> tuple[nn.Module, int] | None:
        """The intermediate module an auxiliary head reads, and its output channels; None: no auxiliary head."""
        return None

    def enable_aux_head(self, *, channels: int = 256, dropout: float = 0.1) -> None:
        """Add an FCN-style auxiliary head (mmsegmentation's ``FCNHead`` with one conv: 3x3 conv, BN, ReLU,
        Dropout2d, 1x1 classifier) on :meth:`aux_source`'s output, for deep supervision in source training.

        It only runs when ``forward(..., return_aux=True)`` asks for it, so inference, evaluation and export see
        the plain model; it is saved with the model (``build_args["aux_head"]``). Its parameters are "head".
        """
        src = self.aux_source()
        if src is None:
            raise ValueError(f"{self.name}: this model has no auxiliary head")
        module, cin = src
        mid = min(int(channels), int(cin))
        self.aux_head = nn.Sequential(
            nn.Conv2d(cin, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Dropout2d(dropout), nn.Conv2d(mid, self.num_classes, 1))

        # A bound method, not a closure: a deepcopy of the model (an EMA teacher) hooks its own copy.
        module.register_forward_hook(self._keep_aux_input)
        self.build_args["aux_head"] = True

    def _keep_aux_input(self, _module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        if self._aux_wanted:
            self._aux_input = output

    # -- parameters -------------------------------------------------------------------------------------------

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """``{"backbone": [...], "head": [...]}``: every parameter exactly once (frozen ones included)."""
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        groups: dict[str, list[nn.Parameter]] = {"backbone": [], "head": []}
        for p in self.parameters():  # deduplicated by nn.Module
            groups["backbone" if id(p) in backbone_ids else "head"].append(p)
        return groups

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh ``C``-way classifier (same dropout, device and dtype); the rest is kept."""
        old_conv = self.classifier[1]
        self.classifier = make_classifier(self.feature_dim, num_classes, float(self.classifier[0].p))
        self.classifier.to(device=old_conv.weight.device, dtype=old_conv.weight.dtype)
        if self.aux_head is not None:  # its last conv predicts the classes too
            old = self.aux_head[-1]
            self.aux_head[-1] = nn.Conv2d(old.in_channels, num_classes, 1).to(old.weight.device, old.weight.dtype)
        self.num_classes = int(num_classes)
        self.build_args["num_classes"] = self.num_classes

    # -- checkpoint hooks -------------------------------------------------------------------------------------

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict written to checkpoints (subclasses may rename keys into a version-stable layout)."""
        return self.state_dict()

    def load_checkpoint_state_dict(self, state_dict: Mapping[str, torch.Tensor], *, source: str | Path) -> None:
        """Strictly load a state dict written by :meth:`checkpoint_state_dict`; errors name ``source``."""
        load_state_dict_checked(self, state_dict, source=source, expected=f"a state dict of model {self.name!r}")

    def load_foreign_state_dict(self, state_dict: Mapping[str, torch.Tensor], *, source: str | Path) -> None:
        """Load a state dict that is not an sfdaseg checkpoint (subclasses convert known layouts)."""
        self.load_checkpoint_state_dict(state_dict, source=source)

    def load_pretrained_folder(self, path: Path) -> None:
        """Load weights from a folder (Hugging Face layout); only some models support it."""
        raise WeightsError(
            f"{path} is a folder, but model {self.name!r} loads weights from a file "
            "(an sfdaseg checkpoint or a state dict); only segformer_* models read a Hugging Face folder"
        )

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, num_classes={self.num_classes}, feature_dim={self.feature_dim}, "
            f"output_stride={self.output_stride}"
        )


# --------------------------------------------------------------------------------------------------------------
# Checked loading
# --------------------------------------------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module behind DDP / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers.

    Stops at the first :class:`SegmentationModel` (whatever attributes it has).
    """
    for _ in range(8):  # wrappers nest at most a few levels deep (compile(DDP(model)), ...)
        if isinstance(model, SegmentationModel):
            return model
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
    return model


def _short_list(items: Iterable[str], limit: int = 8) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return f"{shown}, ... ({len(items)} in all)" if len(items) > limit else shown


def load_state_dict_checked(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str | Path,
    expected: str,
    error: type[Exception] = WeightsError,
    skip_prefixes: tuple[str, ...] = (),
) -> None:
    """``module.load_state_dict(state_dict, strict=True)`` with an error that names the file and the keys.

    Raises ``error`` listing missing keys, unexpected keys and shape mismatches (file shape vs model shape).
    Keys of the module starting with ``skip_prefixes`` are not expected in ``state_dict`` (loaded elsewhere).
    """
    own = {k: v for k, v in module.state_dict().items() if not (skip_prefixes and k.startswith(skip_prefixes))}
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and isinstance(state_dict[k], torch.Tensor) and state_dict[k].shape != own[k].shape
    ]
    not_tensors = [k for k in own if k in state_dict and not isinstance(state_dict[k], torch.Tensor)]
    if missing or unexpected or mismatched or not_tensors:
        parts = [f"{source}: the weights do not fit {expected}."]
        if mismatched:
            parts.append(f"Shape mismatches: {_short_list(mismatched, 5)}.")
        if missing:
            parts.append(f"Missing keys: {_short_list(missing)}.")
        if unexpected:
            parts.append(f"Unexpected keys: {_short_list(unexpected)}.")
        if not_tensors:
            parts.append(f"Not tensors: {_short_list(not_tensors)}.")
        raise error(" ".join(parts))
    module.load_state_dict(state_dict, strict=not skip_prefixes)


def check_num_classes(found: int, expected: int, *, source: str | Path) -> None:
    if int(found) != int(expected):
        raise WeightsError(
            f"{source}: the weights have {found} classes but the model was asked for num_classes={expected}"
        )


def load_weights(model: SegmentationModel, weights: str | Path) -> None:
    """Load local ``weights`` into ``model``: an sfdaseg checkpoint, a state dict file, or a folder.

    * sfdaseg checkpoint: same model name and number of classes, loaded strictly; its normalisation is adopted.
    * a folder: :meth:`SegmentationModel.load_pretrained_folder` (Hugging Face layout, SegFormer only).
    * any other file: a state dict (torch or safetensors), converted by
      :meth:`SegmentationModel.load_foreign_state_dict` (torchvision layouts, ...).

    Nothing is downloaded: ``weights`` must exist on disk.
    """
    path = Path(weights).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"weights not found: {path} (weights are local files or folders; nothing is downloaded)"
        )
    if path.is_dir():
        model.load_pretrained_folder(path)
        return
    load_weights_from(model, safe_load(path), source=path)


def load_weights_from(model: SegmentationModel, obj: Mapping, *, source: Path) -> None:
    """:func:`load_weights` for a file already read with :func:`sfdaseg.storage.safe_load` (read once)."""
    if is_sfdaseg_checkpoint(obj):
        info = CheckpointInfo.from_checkpoint(obj, path=source)
        if info.name != model.name:
            raise WeightsError(
                f"{source} is a checkpoint of model {info.name!r}, but model {model.name!r} was requested"
            )
        check_num_classes(info.num_classes, model.num_classes, source=source)
        model.load_checkpoint_state_dict(obj["state_dict"], source=source)
        if info.normalization != model.normalization:
            logger.info("%s: using the checkpoint's input normalisation %s", source, info.normalization)
            model.set_normalization(info.normalization)
        return
    model.load_foreign_state_dict(unwrap_state_dict(obj, source=source), source=source)
