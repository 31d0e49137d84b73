"""``sfdaseg predict``: segment every image under a folder with a checkpoint or an exported ONNX graph.

For ``IMAGES/street/0001.jpg`` it writes, under ``OUT``::

    labels/street/0001.png       uint8 class ids (the model's class indices, or trainIds / labelIds: ``ids=``)
    color/street/0001.png        the class colours
    overlay/street/0001.jpg      the colour mask blended over the image (``alpha``)
    confidence/street/0001.png   optional: the top class probability, 0..255
    entropy/street/0001.png      optional: the prediction entropy divided by logger.info(C), 0..255

Images keep their native size. Those of the same size are batched (``batch_size``); an image whose longer
side exceeds ``slide_above`` is segmented with a sliding window (``crop``, ``stride``), or every image with
``mode=slide`` / ``mode=whole``. Inference is ``sfdaseg.evaluation.predict_logits`` for both back ends: a
PyTorch model, or an ONNX file (``--checkpoint model.onnx``) run by onnxruntime behind the same interface.

Decoding runs in DataLoader workers, PNG/JPEG encoding in a small thread pool, so the device is not kept
waiting by the file system.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sfdaseg.config import ConfigError, PredictConfig
from sfdaseg.data.classes import (CITYSCAPES_NAMES, CITYSCAPES_PALETTE, PROTOCOLS, TRAINID_TO_LABELID, ClassSpec,
                                  colorize)
from sfdaseg.data.datasets import IMAGE_EXTENSIONS, DatasetError, DatasetWarning, decode_rgb
from sfdaseg.engine.distributed import resolve_device
from sfdaseg.evaluation.inference import predict_logits
from sfdaseg.models import load_model
from sfdaseg.runs.export import OnnxSegmenter

logger = logging.getLogger(__name__)

__all__ = ["PREDICT_EXTENSIONS", "Predictor", "list_images", "load_predictor", "prediction_classes", "id_table",
           "run_predict"]

# Pillow reads TIFF too (``decode_rgb`` hands every format torchvision lacks to Pillow).
PREDICT_EXTENSIONS = tuple(IMAGE_EXTENSIONS) + (".tif", ".tiff")
ONNX_SUFFIX = ".onnx"


# ----------------------------------------------------------------------------------------------------------
# Classes: names, colours and the ids written to the class-index PNGs
# ----------------------------------------------------------------------------------------------------------


def _cityscapes_train_ids(names: Sequence[str]) -> tuple[int, ...] | None:
    """The trainId of every class when all names are Cityscapes class names (19, 16 or 13-class models)."""
    index = {n: i for i, n in enumerate(CITYSCAPES_NAMES)}
    ids = tuple(index.get(str(n).lower(), -1) for n in names)
    return ids if ids and min(ids) >= 0 and len(set(ids)) == len(ids) else None


def _train_ids(classes: ClassSpec, protocol: int | None) -> tuple[int, ...] | None:
    """Cityscapes trainIds of the model's classes: by name, else by the protocol, else all 19 for 19 classes."""
    ids = _cityscapes_train_ids(classes.names)
    if ids is None and protocol is not None and len(PROTOCOLS[protocol]) == classes.num_classes:
        ids = PROTOCOLS[protocol]
    if ids is None and classes.num_classes == len(CITYSCAPES_NAMES):
        ids = tuple(range(len(CITYSCAPES_NAMES)))
    return ids


def prediction_classes(classes: ClassSpec | None, num_classes: int, *, protocol: int | None = None) -> ClassSpec:
    """The names and colours predictions are drawn with.

    The model's class spec when it carries a palette; else, for Cityscapes classes (matched by name, by the
    16/13-class ``protocol``, or by a count of 19), the official Cityscapes colours; else the spec's
    deterministic generated palette. ``classes`` may be ``None`` (an ONNX file without metadata): the names
    are then the Cityscapes ones where the colours are, else ``class_0``, ``class_1``, ...
    """
    if classes is not None and classes.num_classes != num_classes:
        raise ValueError(f"the class spec has {classes.num_classes} classes but the model predicts {num_classes}")
    if classes is not None and classes.palette is not None:
        return classes
    base = classes or ClassSpec(names=tuple(f"class_{i}" for i in range(num_classes)))
    ids = _train_ids(base, protocol)
    if ids is None:
        return base
    names = base.names if classes is not None else tuple(CITYSCAPES_NAMES[i] for i in ids)
    return ClassSpec(names=names, palette=tuple(CITYSCAPES_PALETTE[i] for i in ids), ignore_index=base.ignore_index)


def id_table(classes: ClassSpec, ids: str, *, protocol: int | None = None) -> np.ndarray | None:
    """A uint8 lookup table class index -> the value written to the class-index PNG; ``None`` for ``"class"``.

    ``"trainid"``: Cityscapes trainIds (the identity for a 19-class Cityscapes model; the protocol's ids for a
    16/13-class one); ``"labelid"``: Cityscapes labelIds, the values the official benchmark server expects.
    """
    if ids == "class":
        return None
    if ids not in ("trainid", "labelid"):
        raise ConfigError(f"ids: expected class, trainid or labelid, got {ids!r}")
    train_ids = _train_ids(classes, protocol)
    if train_ids is None:
        raise ConfigError(
            f"ids={ids}: the model's {classes.num_classes} classes ({', '.join(classes.names[:5])}"
            f"{', ...' if classes.num_classes > 5 else ''}) are not Cityscapes classes; use ids=class"
        )
    values = [TRAINID_TO_LABELID[t] for t in train_ids] if ids == "labelid" else list(train_ids)
    table = np.zeros(256, dtype=np.uint8)
    table[: len(values)] = values
    return table


# ----------------------------------------------------------------------------------------------------------
# Models: a PyTorch checkpoint or an ONNX file behind one interface
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Predictor:
    """A model ready for ``predict_logits``: ``model(x)`` maps RGB ``[0, 1]`` ``(B, 3, H, W)`` to logits.

    Attributes:
        model: an eval-mode :class:`SegmentationModel` or an :class:`OnnxSegmenter`.
        device: where input batches go (the CPU for ONNX: onnxruntime moves data to its own device).
        classes: the model's class spec (``None`` for an ONNX file without sfdaseg metadata).
        num_classes: ``C``.
        name: the model name.
        runtime: ``"PyTorch"`` or ``"onnxruntime (providers)"``, for messages.
    """

    model: nn.Module
    device: torch.device
    classes: ClassSpec | None
    num_classes: int
    name: str
    runtime: str

    @property
    def is_onnx(self) -> bool:
        return self.runtime.startswith("onnxruntime")


def _resolve_device(name: str) -> torch.device:
    try:
        return resolve_device(name)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"device: {e}") from None


def load_predictor(path: str | Path, *, device: str = "auto") -> Predictor:
    """Load a checkpoint (``.pt`` / ``.safetensors``, via ``load_model``) or an ONNX file (``.onnx``)."""
    path = Path(path).expanduser()
    if path.suffix.lower() == ONNX_SUFFIX:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
            raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N, got {device!r}")
        model = OnnxSegmenter(path, device=device)
        raw = model.metadata.get("classes")
        try:
            classes = ClassSpec.from_dict(raw) if raw else None
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{path}: invalid class spec in the ONNX metadata: {e}") from None
        if classes is not None and classes.num_classes != model.num_classes:
            raise ConfigError(f"{path}: the metadata names {classes.num_classes} classes but the graph outputs "
                              f"{model.num_classes}")
        return Predictor(model=model, device=torch.device("cpu"), classes=classes, num_classes=model.num_classes,
                         name=model.name, runtime=f"onnxruntime ({', '.join(model.providers)})")
    dev = _resolve_device(device)
    model, info = load_model(path, map_location=dev)
    return Predictor(model=model, device=dev, classes=info.classes, num_classes=model.num_classes,
                     name=info.name, runtime=f"PyTorch on {dev}")


# ----------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------


def list_images(root: str | Path, *, exclude: str | Path | None = None) -> list[tuple[Path, str]]:
    """``(file, name)`` for every image under ``root`` (recursive, sorted); ``name`` is the relative path
    without extension (``street/0001``). ``root`` may also be one image file.

    Hidden files and folders are not images; nothing under ``exclude`` (an output folder inside ``root``) is.

    Raises:
        DatasetError: no image was found, or two files share a name (``a.jpg`` and ``a.png``), which would
            write to the same outputs.
    """
    root = Path(root).expanduser()
    if root.is_file():
        if root.suffix.lower() not in PREDICT_EXTENSIONS:
            raise DatasetError(f"{root}: expected an image file ({'/'.join(PREDICT_EXTENSIONS)})")
        return [(root, root.stem)]
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder")
    skip = Path(exclude).expanduser().resolve() if exclude is not None else None
    files = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.suffix.lower() not in PREDICT_EXTENSIONS or any(part.startswith(".") for part in rel.parts):
            continue
        if skip is not None and p.resolve().is_relative_to(skip):
            continue
        if p.is_file():
            files.append((p, rel.with_suffix("").as_posix()))
    if not files:
        raise DatasetError(f"{root}: no images found (searched recursively for {'/'.join(PREDICT_EXTENSIONS)})")
    seen: dict[str, Path] = {}
    for p, name in files:
        if name in seen:
            raise DatasetError(f"{seen[name]} and {p} would write the same prediction files ({name}.png); "
                               "rename one of them")
        seen[name] = p
    return files


def _image_size(path: Path) -> tuple[int, int]:
    """``(H, W)`` from the file header (nothing is decoded)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception as e:  # noqa: BLE001 - Pillow raises OSError, UnidentifiedImageError, ...
        raise DatasetError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from None
    return h, w


class _ImageFiles(Dataset):
    """Decoded images; a decoding error comes back as a message (the main process raises or skips)."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            return {"index": i, "image": decode_rgb(self.files[i]), "error": None}
        except DatasetError as e:
            return {"index": i, "image": None, "error": str(e)}


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------


def _save(array: np.ndarray, path: Path, **options: Any) -> None:
    from PIL import Image

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path, **options)
    except OSError as e:
        raise OSError(f"could not write {path}: {e}") from e


def _write_outputs(out: Path, name: str, image: torch.Tensor, pred: np.ndarray, extra: dict[str, np.ndarray],
                   *, colors: Sequence[tuple[int, int, int]], table: np.ndarray | None, cfg: PredictConfig) -> None:
    """Every output file of one image (runs in a writer thread: colourising and encoding are CPU work)."""
    _save(table[pred] if table is not None else pred, out / "labels" / f"{name}.png")
    if cfg.color or cfg.overlay:
        color = colorize(pred, colors)  # (H, W, 3) uint8
        if cfg.color:
            _save(color, out / "color" / f"{name}.png")
        if cfg.overlay:
            rgb = image.permute(1, 2, 0).numpy()  # (H, W, 3) uint8
            blend = (1.0 - cfg.alpha) * rgb.astype(np.float32) + cfg.alpha * color.astype(np.float32)
            options = {"quality": 90} if cfg.overlay_format == "jpg" else {}
            _save(np.rint(blend).astype(np.uint8), out / "overlay" / f"{name}.{cfg.overlay_format}", **options)
    for kind, array in extra.items():
        _save(array, out / kind / f"{name}.png")


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """``[0, 1]`` floats -> ``0..255``."""
    return x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------


def _progress(total: int, enabled: bool):
    return tqdm(total=total, desc="predict", unit="img", dynamic_ncols=True, file=sys.stderr, disable=not enabled)


def _problem(message: str, on_error: str) -> None:
    if on_error == "raise":
        raise DatasetError(f"{message} (on_error=skip skips unreadable images with a warning)")
    warnings.warn(f"{message}; skipping it", DatasetWarning, stacklevel=3)


def run_predict(cfg: PredictConfig) -> str:
    """Segment every image of ``cfg.images`` into ``cfg.out``; logs a summary and returns the output folder."""
    predictor = load_predictor(cfg.checkpoint, device=cfg.device)
    classes = prediction_classes(predictor.classes, predictor.num_classes, protocol=cfg.protocol)
    table = id_table(classes, cfg.ids, protocol=cfg.protocol)
    out = Path(cfg.out).expanduser()
    files = list_images(cfg.images, exclude=out)
    logger.info(f"predict: {predictor.name} ({predictor.num_classes} classes, {predictor.runtime}) on {len(files)} "
        f"image(s) from {cfg.images} -> {out}")

    # Sizes from the headers, so that images of one size are decoded (and batched) one after the other.
    sizes: list[tuple[int, int] | None] = []
    for path, _ in files:
        try:
            sizes.append(_image_size(path))
        except DatasetError as e:
            _problem(str(e), cfg.on_error)
            sizes.append(None)
    order = sorted((i for i, s in enumerate(sizes) if s is not None), key=lambda i: (sizes[i], files[i][1]))
    skipped = len(files) - len(order)
    loader = DataLoader(_ImageFiles([p for p, _ in files]), batch_size=None, sampler=order,
                        num_workers=cfg.num_workers if len(order) > 1 else 0)
    pin = predictor.device.type == "cuda"  # the stacked batch is pinned (stacking pinned images would not be)

    # Imported now rather than by the first decode, so forked workers inherit it and the timing excludes it.
    import torchvision.io  # noqa: F401

    num_classes = predictor.num_classes
    log_c = math.log(num_classes) if num_classes > 1 else 1.0
    pending: list[Future] = []
    done = 0
    bar = _progress(len(order), cfg.progress)
    start = time.perf_counter()

    def _maps(x: torch.Tensor, slide: bool) -> dict[str, torch.Tensor]:
        """uint8 ``(B, H, W)`` maps of one forward: labels, and confidence / entropy when asked for."""
        probs = predict_logits(predictor.model, x, mode="slide" if slide else "whole",
                               crop=cfg.crop if slide else None, stride=cfg.stride if slide else None,
                               flip=cfg.flip, amp="fp32" if predictor.is_onnx else cfg.amp)  # (B, C, H, W)
        conf, pred = probs.max(dim=1)  # (B, H, W)
        maps = {"labels": pred.to(torch.uint8)}
        if cfg.confidence:
            maps["confidence"] = _to_uint8(conf)
        if cfg.entropy:
            ent = -(probs * probs.clamp_min(1e-12).log()).sum(dim=1) / log_c  # (B, H, W), 0..1
            maps["entropy"] = _to_uint8(ent)
        return maps

    def flush(batch: list[tuple[int, torch.Tensor]], pool: ThreadPoolExecutor) -> None:
        nonlocal done
        images = torch.stack([img for _, img in batch])  # (B, 3, H, W) uint8, CPU
        if pin:
            images = images.pin_memory()
        h, w = images.shape[-2:]
        slide = cfg.mode == "slide" or (cfg.mode == "auto" and max(h, w) > cfg.slide_above)
        x = images.to(predictor.device, non_blocking=True)
        # Windows are batched inside predict_logits, so large images gain nothing from sharing a forward pass
        # and go one at a time: that bounds the (B, C, H, W) probabilities a batch of big photos would need.
        chunks = x.split(1) if slide else (x,)
        parts = [_maps(c, slide) for c in chunks]
        # One device -> host copy per map and batch (the sync point of the loop).
        host = {k: torch.cat([p[k] for p in parts]).cpu().numpy() for k in parts[0]}
        for j, (i, image) in enumerate(batch):
            extra = {k: v[j] for k, v in host.items() if k != "labels"}
            pending.append(pool.submit(_write_outputs, out, files[i][1], image, host["labels"][j], extra,
                                       colors=classes.colors, table=table, cfg=cfg))
        # Bound the queue: finished writes are collected (their errors raised) before it grows further.
        while len(pending) > 4 * cfg.batch_size:
            pending.pop(0).result()
        done += len(batch)
        bar.update(len(batch))

    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            batch: list[tuple[int, torch.Tensor]] = []
            for sample in loader:
                i = int(sample["index"])
                if sample["error"] is not None:
                    _problem(sample["error"], cfg.on_error)
                    skipped += 1
                    bar.update(1)
                    continue
                image = sample["image"]
                if batch and (len(batch) == cfg.batch_size or batch[0][1].shape != image.shape):
                    flush(batch, pool)
                    batch = []
                batch.append((i, image))
            if batch:
                flush(batch, pool)
            for f in pending:
                f.result()
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    rate = done / seconds if seconds > 0 else float("inf")
    skipped_note = f", {skipped} skipped (unreadable)" if skipped else ""
    logger.info(f"predict: {done} image(s){skipped_note} in {seconds:.2f} s ({rate:.2f} images/s) -> {out}")
    return str(out)
