"""Paired image/mask transforms on dataset samples, the collate function and the model-input conversion.

A sample is ``{"image": uint8 (3, H, W), "mask": uint8 (H, W), "name": str}`` (``"mask"`` optional). The
transforms wrap image and mask as ``tv_tensors.Image`` / ``tv_tensors.Mask`` so that torchvision's transforms
v2 apply each geometric step to both with the right interpolation (bilinear for the image, nearest for the
mask) and leave everything else (the name) as it is; they hand back plain uint8 tensors. Images stay uint8 up
to the device: :func:`to_model_input` does the ``/255`` there. All sizes are ``(H, W)``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = [
    "MASK_KEYS",
    "PairedTransform",
    "RandomScale",
    "RandomScaleKeepSize",
    "Resize",
    "build_eval_transform",
    "build_train_transform",
    "collate",
    "to_model_input",
]

IGNORE_INDEX = 255
# Sample keys that are per-pixel maps of the image (labels, offline pseudo-labels and their confidence): the
# paired transforms move them with the image like a mask.
MASK_KEYS = ("mask", "pl_label", "pl_conf")


def _size(value: Sequence[int] | None, what: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if len(value) != 2 or not all(int(v) == v and v > 0 for v in value):
        raise ValueError(f"{what}: expected (H, W) with positive integers, got {value!r}")
    return int(value[0]), int(value[1])


class _ResizeBoth(v2.Transform):
    """Resizes ``tv_tensors.Image`` bilinearly (antialiased) and ``tv_tensors.Mask`` by nearest pixel centre.

    The mask uses ``NEAREST_EXACT``: the legacy ``NEAREST`` mode (what v2 applies to masks by default) samples
    ``floor(i * scale)``, which shifts labels by up to one source pixel against the bilinear image; after a
    resize and a random scale the two shifts add up at every class boundary.
    """

    def _resize(self, inpt: Any, size: list[int]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            plain = inpt.as_subclass(torch.Tensor)
            out = F.resize_image(plain.unsqueeze(0) if plain.ndim == 2 else plain, size,
                                 interpolation=v2.InterpolationMode.NEAREST_EXACT)
            return tv_tensors.wrap(out.squeeze(0) if plain.ndim == 2 else out, like=inpt)
        return self._call_kernel(F.resize, inpt, size=size, interpolation=v2.InterpolationMode.BILINEAR,
                                 antialias=True)


class Resize(_ResizeBoth):
    """Resize image and mask to a fixed ``(H, W)``."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = list(size)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._resize(inpt, self.size)

    _transform = transform  # torchvision < 0.21 calls the private name


class RandomScale(_ResizeBoth):
    """Rescale image and mask by one factor drawn uniformly from ``scale_range`` (aspect ratio kept)."""

    def __init__(self, scale_range: tuple[float, float]) -> None:
        super().__init__()
        lo, hi = float(scale_range[0]), float(scale_range[1])
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range: expected 0 < low <= high, got {scale_range!r}")
        self.scale_range = (lo, hi)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        lo, hi = self.scale_range
        # torch's generator (not Python's random) so that DataLoader worker seeding makes it reproducible
        scale = lo + (hi - lo) * float(torch.rand(()))
        return {"size": [max(1, round(height * scale)), max(1, round(width * scale))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._resize(inpt, params["size"])

    # torchvision < 0.21 calls the private names.
    _get_params = make_params
    _transform = transform


class RandomScaleKeepSize(RandomScale):
    """Random scale, then a random crop (or padding: image 0, mask 255) back to the size before scaling.

    What training does without ``crop``: every sample keeps its (resized) size, so a dataset of one image size
    stacks into batches, while the content is still seen at random scales.
    """

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        params = super().make_params(flat_inputs)
        sh, sw = params["size"]
        # Where the original-size window sits in the scaled image (crop), or where the image sits in the window
        # (pad); drawn from torch's RNG like the scale.
        u = torch.rand(2)
        params["top"] = int(u[0] * (abs(sh - height) + 1)) if sh != height else 0
        params["left"] = int(u[1] * (abs(sw - width) + 1)) if sw != width else 0
        params["out"] = (height, width)
        return params

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        out = self._resize(inpt, params["size"])
        (h, w), (sh, sw) = params["out"], params["size"]
        top, left = params["top"], params["left"]
        if sh >= h and sw >= w:
            return F.crop(out, top=top, left=left, height=h, width=w)
        fill = IGNORE_INDEX if isinstance(inpt, tv_tensors.Mask) else 0
        if sh > h or sw > w:  # larger in one dimension, smaller in the other: crop what is larger first
            out = F.crop(out, top=top if sh > h else 0, left=left if sw > w else 0, height=min(sh, h),
                         width=min(sw, w))
            sh, sw = min(sh, h), min(sw, w)
        pt, pl = (top if sh < h else 0), (left if sw < w else 0)
        return F.pad(out, padding=[pl, pt, w - sw - pl, h - sh - pt], fill=fill)

    _get_params = make_params
    _transform = transform


class PairedTransform:
    """Applies a transforms-v2 pipeline to a sample dict and returns plain uint8 tensors.

    Every key of :data:`MASK_KEYS` present in the sample (the label ``"mask"`` and the offline pseudo-label maps
    ``"pl_label"`` / ``"pl_conf"``) is treated as a mask: same geometry as the image, nearest resampling, padding
    255. ``mask_too=False`` keeps them untouched (evaluation at the label's native size).

    ``track_valid=True`` adds ``"valid"``: uint8 ``(H, W)``, 1 on pixels of the image and 0 on the padding a random
    crop added, so that pseudo-labels of an unlabelled target (which has no mask to carry the 255) never label the
    black padding.
    """

    def __init__(self, pipeline: Callable[[Any], Any], *, mask_too: bool = True, track_valid: bool = False) -> None:
        self.pipeline = pipeline
        self.mask_too = mask_too
        self.track_valid = track_valid

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        out = dict(sample)
        if "image" not in out:
            raise KeyError("sample has no 'image' key")
        out["image"] = tv_tensors.Image(out["image"])
        keys = [k for k in MASK_KEYS if out.get(k) is not None]
        if self.mask_too:
            if self.track_valid:  # zeros that the padding turns into 255 (the mask fill value)
                out["valid"] = torch.zeros(out["image"].shape[-2:], dtype=torch.uint8)
                keys.append("valid")
            for k in keys:
                out[k] = tv_tensors.Mask(out[k])
            out = self.pipeline(out)
            for k in keys:
                out[k] = out[k].as_subclass(torch.Tensor)
            if self.track_valid:
                out["valid"] = (out["valid"] == 0).to(torch.uint8)
        else:
            kept = {k: out.pop(k) for k in keys}
            out = self.pipeline(out)
            out.update(kept)
        out["image"] = out["image"].as_subclass(torch.Tensor)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mask_too={self.mask_too}, pipeline={self.pipeline!r})"


def build_train_transform(
    *,
    resize: tuple[int, int] | None,
    scale_range: tuple[float, float] = (1.0, 1.0),
    crop: tuple[int, int] | None,
    hflip: bool = True,
    photometric: bool = False,
    track_valid: bool = False,
) -> PairedTransform:
    """Training augmentation: resize -> random scale -> random crop -> horizontal flip -> colour jitter.

    Args:
        resize: ``(H, W)`` to resize to first (bilinear image, nearest-pixel-centre mask), or None.
        scale_range: a factor drawn uniformly from this range rescales the sample (``(1, 1)``: off).
        crop: ``(H, W)`` random crop; a smaller sample is padded first (image with 0, mask with 255). Without a
            crop the random scale is followed by a random crop (or padding) back to the sample's size before
            scaling, so every sample keeps its (resized) size and images of one size always stack into a batch.
        hflip: random horizontal flip with probability 0.5.
        photometric: colour jitter on the image only (brightness, contrast, saturation, hue).
        track_valid: add ``"valid"`` (1 on image pixels, 0 on crop padding), see :class:`PairedTransform`.

    Works on samples with or without ``"mask"``; outputs uint8 image ``(3, h, w)`` and mask ``(h, w)``.
    """
    resize = _size(resize, "resize")
    crop = _size(crop, "crop")
    steps: list[Callable] = []
    if resize is not None:
        steps.append(Resize(resize))
    if tuple(scale_range) != (1.0, 1.0):
        steps.append(RandomScale(tuple(scale_range)) if crop is not None else RandomScaleKeepSize(tuple(scale_range)))
    if crop is not None:
        steps.append(v2.RandomCrop(list(crop), pad_if_needed=True,
                                   fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}))
    if hflip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    if photometric:
        # Colour transforms have no Mask kernel, so v2 passes the mask through unchanged.
        steps.append(v2.RandomApply([v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05)], p=0.8))
    return PairedTransform(v2.Compose(steps) if steps else v2.Identity(), track_valid=track_valid)


def build_eval_transform(*, resize: tuple[int, int] | None, resize_mask: bool = False) -> PairedTransform:
    """Evaluation preprocessing: resize the image to ``resize`` ``(H, W)`` (bilinear).

    The mask keeps its native size unless ``resize_mask`` (then nearest): evaluation upsamples the logits to
    the label size, so that scores are computed on the original labels.
    """
    resize = _size(resize, "resize")
    pipeline = Resize(resize) if resize is not None else v2.Identity()
    return PairedTransform(pipeline, mask_too=resize_mask)


def to_model_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` (or ``(3, H, W)``) -> float32 in ``[0, 1]``, on the tensor's own device."""
    if images.dtype != torch.uint8:
        raise TypeError(f"to_model_input: expected a torch.uint8 image batch, got {images.dtype}")
    return images.to(torch.float32).div_(255.0)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """DataLoader ``collate_fn`` for sample dicts.

    Tensors are stacked when every sample's shape agrees (``image -> (B, 3, H, W)``, ``mask -> (B, H, W)``) and
    kept as lists otherwise (evaluation at native sizes); strings (``name``) and other values become lists.
    """
    if not samples:
        raise ValueError("collate: expected at least one sample")
    keys = list(samples[0])
    for i, s in enumerate(samples):
        if set(s) != set(keys):
            raise ValueError(f"collate: sample {i} has keys {sorted(s)}, expected {sorted(keys)} like sample 0")
    batch: dict[str, Any] = {}
    for key in keys:
        values = [s[key] for s in samples]
        if all(isinstance(v, torch.Tensor) for v in values) and len({tuple(v.shape) for v in values}) == 1 \
                and len({v.dtype for v in values}) == 1:
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch
