"""SegFormer (MiT-B0 ... B5 encoder + all-MLP decoder) through Hugging Face ``transformers``.

The encoder is ``transformers.SegformerModel``. The decoder is ours, written to the same equations and
parameter names as ``SegformerDecodeHead`` so that Hugging Face weights load one to one::

    stage i output (B, C_i, H/2^(i+2), W/2^(i+2))
      -> linear_c[i] (a per-pixel Linear C_i -> D)  -> upsample to H/4 x W/4
    concat over stages, deepest first (B, 4D, H/4, W/4)
      -> linear_fuse (1x1 conv, no bias) -> batch_norm -> ReLU    = features (B, D, H/4, W/4)
      -> classifier: Dropout2d(p) + Conv2d(D, C, 1)               = logits   (B, C, H/4, W/4)

The HF head applies ``nn.Dropout`` before its classifier; ours is the shared ``Dropout2d`` (MC-dropout samples
it), and the HF classifier weights are reused as ours.

Version-stable checkpoints: transformers 5.x renamed the encoder's parameters (``encoder.block.0.0.attention.
self.query`` became ``stages.0.blocks.0.attention.q_proj``, ...). Our checkpoints always store the classic
layout (the one of every Hugging Face hub file, and of transformers 4.x), so a checkpoint written under one
transformers version loads under another.
"""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

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

# MiT encoder sizes (Xie et al. 2021, Table 6; the configs of nvidia/mit-b0 ... nvidia/mit-b5) and the
# decoder width the paper uses with each (256 for B0/B1, 768 for B2-B5).
_COMMON = {
    "num_encoder_blocks": 4,
    "num_attention_heads": [1, 2, 5, 8],
    "sr_ratios": [8, 4, 2, 1],
    "patch_sizes": [7, 3, 3, 3],
    "strides": [4, 2, 2, 2],
    "mlp_ratios": [4, 4, 4, 4],
}
VARIANTS: dict[str, dict[str, Any]] = {
    "b0": {**_COMMON, "hidden_sizes": [32, 64, 160, 256], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256},
    "b1": {**_COMMON, "hidden_sizes": [64, 128, 320, 512], "depths": [2, 2, 2, 2], "decoder_hidden_size": 256},
    "b2": {**_COMMON, "hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 6, 3], "decoder_hidden_size": 768},
    "b3": {**_COMMON, "hidden_sizes": [64, 128, 320, 512], "depths": [3, 4, 18, 3], "decoder_hidden_size": 768},
    "b4": {**_COMMON, "hidden_sizes": [64, 128, 320, 512], "depths": [3, 8, 27, 3], "decoder_hidden_size": 768},
    "b5": {**_COMMON, "hidden_sizes": [64, 128, 320, 512], "depths": [3, 6, 40, 3], "decoder_hidden_size": 768},
}
# The config fields that fix the encoder's parameter shapes (compared against a weights folder).
ENCODER_FIELDS = ("num_encoder_blocks", "hidden_sizes", "depths", "num_attention_heads", "sr_ratios",
                  "patch_sizes", "strides", "mlp_ratios")

# transformers >= 5 (new layout) <-> classic layout, for keys of SegformerModel. Order matters: the stage
# prefixes first, then the per-block names.
_NEW_TO_CLASSIC = (
    (r"^stages\.(\d+)\.patch_embeddings\.", r"encoder.patch_embeddings.\1."),
    (r"^stages\.(\d+)\.blocks\.", r"encoder.block.\1."),
    (r"^stages\.(\d+)\.layer_norm\.", r"encoder.layer_norm.\1."),
    (r"\.attention\.q_proj\.", ".attention.self.query."),
    (r"\.attention\.k_proj\.", ".attention.self.key."),
    (r"\.attention\.v_proj\.", ".attention.self.value."),
    (r"\.attention\.sequence_reduction\.sequence_reduction\.", ".attention.self.sr."),
    (r"\.attention\.sequence_reduction\.layer_norm\.", ".attention.self.layer_norm."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."),
    (r"\.mlp\.fc1\.", ".mlp.dense1."),
    (r"\.mlp\.fc2\.", ".mlp.dense2."),
    (r"\.layernorm_before\.", ".layer_norm_1."),
    (r"\.layernorm_after\.", ".layer_norm_2."),
)
_CLASSIC_TO_NEW = (
    (r"^encoder\.patch_embeddings\.(\d+)\.", r"stages.\1.patch_embeddings."),
    (r"^encoder\.block\.(\d+)\.", r"stages.\1.blocks."),
    (r"^encoder\.layer_norm\.(\d+)\.", r"stages.\1.layer_norm."),
    (r"\.attention\.self\.query\.", ".attention.q_proj."),
    (r"\.attention\.self\.key\.", ".attention.k_proj."),
    (r"\.attention\.self\.value\.", ".attention.v_proj."),
    (r"\.attention\.self\.sr\.", ".attention.sequence_reduction.sequence_reduction."),
    (r"\.attention\.self\.layer_norm\.", ".attention.sequence_reduction.layer_norm."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.mlp\.dense1\.", ".mlp.fc1."),
    (r"\.mlp\.dense2\.", ".mlp.fc2."),
    (r"\.layer_norm_1\.", ".layernorm_before."),
    (r"\.layer_norm_2\.", ".layernorm_after."),
)


def _rename(key: str, rules: tuple[tuple[str, str], ...]) -> str:
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def _uses_new_layout(encoder: nn.Module) -> bool:
    return hasattr(encoder, "stages")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and progress bars; we log our own, shorter summary."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    bars = getattr(hf_logging, "is_progress_bar_enabled", lambda: False)()
    if bars and hasattr(hf_logging, "disable_progress_bar"):
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars and hasattr(hf_logging, "enable_progress_bar"):
            hf_logging.enable_progress_bar()


class _Projection(nn.Module):
    """Per-pixel Linear ``C_i -> D`` (parameter names as HF ``SegformerMLP``: ``proj.weight``, ``proj.bias``)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_i, h, w)`` -> ``(B, D, h, w)``: a 1x1 convolution with the Linear's weights (no transposes)."""
        return F.conv2d(x, self.proj.weight[:, :, None, None], self.proj.bias)


class SegformerMLPDecoder(nn.Module):
    """The all-MLP decoder up to (and including) BN + ReLU; see the module docstring for the data flow."""

    def __init__(self, hidden_sizes: list[int], decoder_hidden_size: int) -> None:
        super().__init__()
        self.linear_c = nn.ModuleList(_Projection(c, decoder_hidden_size) for c in hidden_sizes)
        self.linear_fuse = nn.Conv2d(decoder_hidden_size * len(hidden_sizes), decoder_hidden_size, 1, bias=False)
        self.batch_norm = nn.BatchNorm2d(decoder_hidden_size)
        self.activation = nn.ReLU()

    def forward(self, stages: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
        """Stage outputs ``[(B, C_i, h_i, w_i)]`` (stride 4, 8, 16, 32) -> ``(B, D, h_0, w_0)``."""
        size = stages[0].shape[-2:]
        projected = []
        for x, proj in zip(stages, self.linear_c, strict=True):
            x = proj(x)  # (B, D, h_i, w_i)
            if x.shape[-2:] != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            projected.append(x)
        x = torch.cat(projected[::-1], dim=1)  # (B, 4D, h_0, w_0), deepest stage first as in the HF head
        return self.activation(self.batch_norm(self.linear_fuse(x)))


class SegFormer(SegmentationModel):
    """SegFormer-B{0..5}; output stride 4, features = the decoder's fused ``(B, D, H/4, W/4)`` map."""

    def __init__(
        self,
        *,
        variant: str,
        num_classes: int,
        decoder_hidden_size: int | None = None,
        dropout: float = 0.1,
        drop_path_rate: float = 0.1,
        normalization: str | Mapping | Normalization = "imagenet",
    ) -> None:
        from transformers import SegformerConfig, SegformerModel

        if variant not in VARIANTS:
            raise ValueError(f"SegFormer variant: expected one of {sorted(VARIANTS)}, got {variant!r}")
        arch = VARIANTS[variant]
        decoder_hidden_size = int(decoder_hidden_size or arch["decoder_hidden_size"])
        super().__init__(
            name=f"segformer_{variant}",
            num_classes=num_classes,
            feature_dim=decoder_hidden_size,
            output_stride=4,
            normalization=normalization,
            dropout=dropout,
            build_args={
                "decoder_hidden_size": decoder_hidden_size,
                "dropout": dropout,
                "drop_path_rate": drop_path_rate,
            },
        )
        self.variant = variant
        self.config = SegformerConfig(
            **{k: v for k, v in arch.items() if k != "decoder_hidden_size"},
            decoder_hidden_size=decoder_hidden_size,
            drop_path_rate=drop_path_rate,
            classifier_dropout_prob=dropout,
            num_labels=num_classes,
        )
        self.backbone = SegformerModel(self.config)
        self.decode_head = SegformerMLPDecoder(list(arch["hidden_sizes"]), decoder_hidden_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised ``(B, 3, H, W)`` -> ``(B, D, H/4, W/4)``."""
        # Our config keeps reshape_last_stage=True: every stage output is a (B, C_i, h_i, w_i) map.
        stages = self.backbone(x, output_hidden_states=True).hidden_states
        return self.decode_head(stages[-self.config.num_encoder_blocks :])

    # -- version-stable checkpoints ------------------------------------------------------------------------

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """``state_dict()`` with the encoder's keys in the classic (transformers 4.x / hub file) layout."""
        sd = self.state_dict()
        if not _uses_new_layout(self.backbone):
            return sd
        return {
            ("backbone." + _rename(k[len("backbone.") :], _NEW_TO_CLASSIC) if k.startswith("backbone.") else k): v
            for k, v in sd.items()
        }

    def load_checkpoint_state_dict(self, state_dict: Mapping[str, torch.Tensor], *, source: str | Path) -> None:
        """Load a state dict in either layout (classic or transformers-5), strictly."""
        new = _uses_new_layout(self.backbone)
        converted = {}
        for k, v in state_dict.items():
            if k.startswith("backbone."):
                inner = k[len("backbone.") :]
                inner = _rename(inner, _CLASSIC_TO_NEW) if new else _rename(inner, _NEW_TO_CLASSIC)
                k = "backbone." + inner
            converted[k] = v
        load_state_dict_checked(self, converted, source=source, expected=f"a state dict of model {self.name!r}")

    def load_foreign_state_dict(self, state_dict: Mapping[str, torch.Tensor], *, source: str | Path) -> None:
        raise WeightsError(
            f"{source}: {self.name} loads Hugging Face weights from a folder (config.json + model.safetensors "
            "or pytorch_model.bin), e.g. a local copy of nvidia/mit-b5, or an sfdaseg checkpoint; "
            "pass the folder, not a bare state dict file"
        )

    # -- Hugging Face folders -----------------------------------------------------------------------------------

    def load_pretrained_folder(self, path: Path) -> None:
        """Load a local Hugging Face SegFormer folder: a full segmentation model or an encoder only.

        The encoder must have this variant's sizes. A decoder is loaded when the folder has one; the
        classifier is reused when its number of classes matches and re-initialised (with a warning) otherwise.
        """
        from transformers import SegformerForSemanticSegmentation

        config = read_hf_config(path)
        check_encoder_config(config, self.variant, source=path)
        folder_decoder_size = config.decoder_hidden_size
        config.num_labels = self.num_classes  # also resets id2label / label2id consistently
        config.decoder_hidden_size = self.feature_dim
        with _quiet_transformers():
            try:
                hf, info = SegformerForSemanticSegmentation.from_pretrained(
                    str(path),
                    config=config,
                    local_files_only=True,
                    ignore_mismatched_sizes=True,
                    output_loading_info=True,
                )
            except (OSError, ValueError, RuntimeError) as e:
                raise WeightsError(f"{path}: cannot load the Hugging Face SegFormer weights: {e}") from e
        missing = {str(k) for k in info.get("missing_keys", ())}
        mismatched = {str(m[0]) if isinstance(m, (tuple, list)) else str(m) for m in info.get("mismatched_keys", ())}
        not_loaded = missing | mismatched
        encoder_missing = sorted(k for k in not_loaded if k.startswith("segformer."))
        if encoder_missing:
            raise WeightsError(
                f"{path}: the folder's weights do not cover the {self.variant.upper()} encoder; not found or of "
                f"another shape: {encoder_missing[:8]} ({len(encoder_missing)} in all)"
            )
        self.backbone.load_state_dict(hf.segformer.state_dict(), strict=True)

        head = hf.decode_head
        head_missing = [k for k in missing if k.startswith("decode_head.") and ".classifier." not in k]
        head_mismatched = [k for k in mismatched if k.startswith("decode_head.") and ".classifier." not in k]
        if head_missing or head_mismatched:
            why = (
                f"its decoder has another width ({folder_decoder_size}, model: {self.feature_dim})"
                if head_mismatched
                else "it holds only an encoder"
            )
            logger.warning("%s: %s; the SegFormer decoder and classifier start untrained", path, why)
            return
        # transformers 5 renamed SegformerDecodeHead.linear_c to linear_projections.
        projections = getattr(head, "linear_projections", None) or head.linear_c
        for ours, theirs in zip(self.decode_head.linear_c, projections, strict=True):
            ours.proj.load_state_dict(theirs.proj.state_dict())
        self.decode_head.linear_fuse.load_state_dict(head.linear_fuse.state_dict())
        self.decode_head.batch_norm.load_state_dict(head.batch_norm.state_dict())
        if any(".classifier." in k for k in not_loaded):
            logger.warning(
                "%s: the classifier was re-initialised for num_classes=%d (the folder's classifier has another "
                "number of classes); the encoder and decoder were loaded",
                path,
                self.num_classes,
            )
        else:
            self.classifier[1].load_state_dict(head.classifier.state_dict())


def read_hf_config(path: Path):
    """The ``SegformerConfig`` of a local folder; errors name the folder."""
    from transformers import SegformerConfig

    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise WeightsError(f"{path}: not a Hugging Face model folder (no config.json)")
    try:
        config_dict = SegformerConfig.get_config_dict(str(path), local_files_only=True)[0]
    except (OSError, ValueError) as e:
        raise WeightsError(f"{config_file}: cannot read the config: {e}") from e
    model_type = config_dict.get("model_type")
    if model_type != "segformer":
        raise WeightsError(f"{path}: the folder holds a {model_type!r} model, expected a 'segformer' model")
    with _quiet_transformers():
        return SegformerConfig.from_pretrained(str(path), local_files_only=True)


def check_encoder_config(config: Any, variant: str, *, source: str | Path) -> None:
    """Raise when the folder's encoder sizes are not those of ``variant``; suggest the matching variant."""
    expected = VARIANTS[variant]
    diffs = [
        f"{k}: folder {list(getattr(config, k))!r} vs {variant} {expected[k]!r}"
        if isinstance(expected[k], list)
        else f"{k}: folder {getattr(config, k)!r} vs {variant} {expected[k]!r}"
        for k in ENCODER_FIELDS
        if _as_list(getattr(config, k, None)) != _as_list(expected[k])
    ]
    if diffs:
        match = [
            v for v, arch in VARIANTS.items()
            if all(_as_list(getattr(config, k, None)) == _as_list(arch[k]) for k in ENCODER_FIELDS)
        ]
        hint = f"; it holds a MiT-{match[0].upper()} encoder: use model segformer_{match[0]}" if match else ""
        raise WeightsError(
            f"{source}: the encoder is not a MiT-{variant.upper()} ({'; '.join(diffs)}){hint}"
        )


def _as_list(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


def _folder_decoder_size(path: Path, variant: str) -> int | None:
    """The decoder width of a folder that holds a full segmentation model (else None: use the variant's)."""
    config = read_hf_config(path)
    check_encoder_config(config, variant, source=path)
    archs = config.architectures or []
    return int(config.decoder_hidden_size) if "SegformerForSemanticSegmentation" in archs else None


def build_segformer(
    variant: str,
    *,
    num_classes: int,
    weights: str | Path | None = None,
    decoder_hidden_size: int | None = None,
    dropout: float = 0.1,
    drop_path_rate: float = 0.1,
    normalization: str | Mapping | Normalization = "imagenet",
) -> SegFormer:
    """SegFormer-``variant`` (``"b0"`` ... ``"b5"``), output stride 4.

    Args:
        num_classes: ``C``.
        weights: a local Hugging Face folder (``SegformerForSemanticSegmentation`` such as a copy of
            nvidia/segformer-b5-finetuned-cityscapes-1024-1024, or an encoder such as nvidia/mit-b5), or an
            sfdaseg checkpoint of this model. ``None`` = random initialisation.
        decoder_hidden_size: decoder width ``D``; default: the folder's when it holds a decoder, else the
            paper's (256 for B0/B1, 768 for B2-B5).
        dropout: ``p`` of the classifier's Dropout2d.
        drop_path_rate: stochastic depth of the encoder.
        normalization: input normalisation (ImageNet statistics for all public MiT weights).
    """
    if weights is not None and decoder_hidden_size is None and Path(weights).expanduser().is_dir():
        decoder_hidden_size = _folder_decoder_size(Path(weights).expanduser(), variant)
    model = SegFormer(
        variant=variant,
        num_classes=num_classes,
        decoder_hidden_size=decoder_hidden_size,
        dropout=dropout,
        drop_path_rate=drop_path_rate,
        normalization=normalization,
    )
    if weights is not None:
        load_weights(model, weights)
    return model
