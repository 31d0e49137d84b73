"""``evaluate``: run a model over a labelled DataLoader and return its segmentation metrics."""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from sfdaseg.data.classes import IGNORE_INDEX
from sfdaseg.evaluation.inference import predict_logits
from sfdaseg.evaluation.metrics import ConfusionMatrix, SegMetrics, resolve_protocol

__all__ = ["evaluate"]


def _as_list(x: torch.Tensor | Sequence[torch.Tensor], key: str) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return list(x.unbind(0))
    if isinstance(x, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in x):
        return list(x)
    raise TypeError(f"batch[{key!r}]: expected a tensor or a list of tensors, got {type(x).__name__}")


def _groups(batch: Mapping) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """``(images (b, 3, H, W) uint8, masks (b, Hm, Wm))`` groups of one size each.

    A collated batch (stacked tensors) is one group; a list batch (images of different sizes) gives one
    group per sample.
    """
    if "image" not in batch:
        raise ValueError(f"evaluate: each batch must hold an 'image' entry, got keys {sorted(batch)}")
    if "mask" not in batch:
        raise ValueError(
            "evaluate: the batch has no 'mask': the dataset was built without labels (with_labels=False); "
            "evaluation needs a labelled dataset"
        )
    images, masks = batch["image"], batch["mask"]
    if isinstance(images, torch.Tensor) and isinstance(masks, torch.Tensor):
        if images.dim() != 4 or masks.dim() != 3 or images.shape[0] != masks.shape[0]:
            raise ValueError(
                f"evaluate: expected batch['image'] (B, 3, H, W) and batch['mask'] (B, Hm, Wm), got "
                f"{tuple(images.shape)} and {tuple(masks.shape)}"
            )
        yield images, masks
        return
    image_list, mask_list = _as_list(images, "image"), _as_list(masks, "mask")
    if len(image_list) != len(mask_list):
        raise ValueError(f"evaluate: {len(image_list)} images but {len(mask_list)} masks in one batch")
    for image, mask in zip(image_list, mask_list):
        if image.dim() != 3 or mask.dim() != 2:
            raise ValueError(
                f"evaluate: expected each image (3, H, W) and each mask (Hm, Wm), got {tuple(image.shape)} "
                f"and {tuple(mask.shape)}"
            )
        yield image.unsqueeze(0), mask.unsqueeze(0)


def _to_float01(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def evaluate(
    model: nn.Module,
    loader: Iterable[Mapping],
    *,
    device: torch.device | str,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
    protocol: int | Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    mode: str = "whole",
    crop: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    flip: bool = False,
    scales: Sequence[float] = (1.0,),
    amp: str = "fp32",
    progress: bool = False,
) -> SegMetrics:
    """mIoU, per-class IoU and pixel accuracy (percent) of ``model`` on ``loader``.

    ``loader`` yields sample dicts: ``image`` uint8 ``(B, 3, H, W)`` (or a list of ``(3, H, W)`` when sizes
    differ) and ``mask`` uint8 ``(B, Hm, Wm)`` (or a list). Predictions are made at the mask size, so labels
    may be larger than the images (evaluation at full label resolution of a downscaled input). The
    confusion matrix stays on ``device`` and is all-reduced once at the end, so under DDP every rank
    evaluates its shard and all ranks get the global result. (A ``DistributedSampler`` pads the dataset
    to a multiple of the world size, counting a few images twice; use an unpadded sharding for exact
    numbers.) The model is put in eval mode and its previous mode is restored.

    See ``predict_logits`` for ``mode``/``crop``/``stride``/``flip``/``scales``/``amp`` and
    ``ConfusionMatrix.compute`` for ``protocol``/``class_names``.
    """
    device = torch.device(device)
    model_classes = getattr(model, "num_classes", None)
    if model_classes is not None and int(model_classes) != num_classes:
        raise ValueError(f"evaluate: num_classes={num_classes} but the model predicts {model_classes} classes")
    resolve_protocol(protocol, num_classes)  # fail before the first forward, not after the last
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"class_names: expected {num_classes} names (one per class), got {len(class_names)}")

    cm = ConfusionMatrix(num_classes, ignore_index=ignore_index, device=device)
    rank0 = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    batches: Iterable[Mapping] = loader
    if progress and rank0:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc="evaluate", unit="batch", dynamic_ncols=True)

    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            for images, masks in _groups(batch):
                masks = masks.to(device, non_blocking=True)
                if masks.is_floating_point():
                    raise TypeError(f"evaluate: batch['mask'] must hold integer class indices, got {masks.dtype}")
                probs = predict_logits(
                    model,
                    _to_float01(images, device),
                    mode=mode,
                    crop=crop,
                    stride=stride,
                    flip=flip,
                    scales=scales,
                    output_size=tuple(masks.shape[-2:]),
                    amp=amp,
                )
                cm.update(probs.argmax(dim=1), masks)
    finally:
        model.train(was_training)
    cm.all_reduce()
    return cm.compute(protocol=protocol, class_names=class_names)
