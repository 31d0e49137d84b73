"""Offline pseudo-labels: a frozen model labels every target image once; the labels are cached on disk.

Layout of a cache rooted at ``root`` for a model with fingerprint ``F`` (:func:`model_fingerprint`)::

    root/<F[:16]>/manifest.json                  # {"fingerprint": F, "entries": {name: [H, W]}, ...}, written last
    root/<F[:16]>/<name>.label.png               # uint8 class ids, 255 = ignore (names with '/' make subfolders)
    root/<F[:16]>/<name>.conf.png                # uint8 round(confidence * 255)

The confidence channel holds the fused maximum probability by default; a labeller may store a *certainty*
there instead (``uncertainty="mc_dropout"``: ``1 -`` the normalised MC-dropout entropy, or variance, of the
prediction; ``"entropy"``: ``1 - H(p) / log C`` of the plain prediction), which the caller then keys into the
fingerprint (``extra``) so that caches of different settings never mix.

Each PNG also carries the full fingerprint in a text chunk, so an entry is self-describing: an entry written
by another model (or a half-written, truncated or unreadable file) is never served as valid. Files are written
to a temporary name in the same folder and renamed, so an interrupted build leaves complete entries or
none, and the next build skips the valid entries and recomputes the rest.

The labels are computed at the image's native resolution (:func:`build_offline_labels`); the training data
pipeline reads them through :class:`WithOfflineLabels`, which puts them in the sample as ``"pl_label"`` and
``"pl_conf"`` before the random crop / flip / scale move them with the image.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, PngImagePlugin
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from sfdaseg.amp import AMP_DTYPES
from sfdaseg.data.transforms import collate, to_model_input
from sfdaseg.models.base import unwrap_model
from sfdaseg.storage import atomic_write_bytes
from sfdaseg.uncertainty import McDropoutResult, mc_dropout

__all__ = [
    "CacheEntryError",
    "OfflineLabelCache",
    "WithOfflineLabels",
    "build_offline_labels",
    "entropy_certainty",
    "mc_certainty",
    "model_fingerprint",
]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_FORMAT = "sfdaseg-offline-labels"
_VERSION = 1
_TEXT_KEY = "sfdaseg-fingerprint"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the empty IEND chunk every complete PNG ends with
UNCERTAINTIES = ("entropy", "mc_dropout")  # what the confidence channel may hold instead of the max probability
MEASURES = ("entropy", "variance")  # MC-dropout: which statistic the certainty comes from


class CacheEntryError(ValueError):
    """A cache entry that is missing, unreadable, corrupt, stale or of the wrong size; the message names the file."""


# --------------------------------------------------------------------------------------------------------------
# Fingerprint
# --------------------------------------------------------------------------------------------------------------


def model_fingerprint(model: nn.Module, *, extra: dict | None = None) -> str:
    """A sha256 hex digest identifying what a model computes.

    Hashed: the model's ``name`` (class name if it has none), its ``build_args`` (JSON), every ``state_dict``
    entry (key, shape and the bytes of a float32 CPU copy, so a bf16 and a float32 copy of one model agree), and
    ``extra`` (JSON; e.g. the labelling scales and input size, which change the labels too).
    """
    model = unwrap_model(model)
    h = hashlib.sha256()

    def add(text: str) -> None:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    add(str(getattr(model, "name", type(model).__qualname__)))
    add(json.dumps(getattr(model, "build_args", None), sort_keys=True, default=str))
    for key, value in sorted(model.state_dict().items()):
        if not isinstance(value, torch.Tensor):
            continue
        add(f"{key}:{tuple(value.shape)}")
        h.update(value.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    add(json.dumps(extra or {}, sort_keys=True, default=str))
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------------------------


def _check_name(name: str) -> PurePosixPath:
    if not isinstance(name, str) or not name:
        raise ValueError(f"offline label cache: sample names must be non-empty strings, got {name!r}")
    rel = PurePosixPath(name.replace("\\", "/"))
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(
            f"offline label cache: sample name {name!r} must be a relative path without '..' (it names files)"
        )
    return rel


class OfflineLabelCache:
    """Offline pseudo-labels of one model, on disk (see the module docstring for the layout).

    Args:
        root: the cache root (several models' caches live side by side under it).
        fingerprint: the model's :func:`model_fingerprint`.

    Attributes:
        folder: ``root / fingerprint[:16]``.
    """

    def __init__(self, root: str | Path, *, fingerprint: str) -> None:
        if not isinstance(fingerprint, str) or len(fingerprint) < 16:
            raise ValueError(f"OfflineLabelCache: expected a hex fingerprint (>= 16 characters), got {fingerprint!r}")
        self.root = Path(root).expanduser()
        self.fingerprint = fingerprint
        self.folder = self.root / fingerprint[:16]

    def __repr__(self) -> str:
        return f"OfflineLabelCache({str(self.folder)!r})"

    # -- paths ----------------------------------------------------------------------------------------------------

    @property
    def manifest_path(self) -> Path:
        return self.folder / MANIFEST

    def label_path(self, name: str) -> Path:
        return self.folder / f"{_check_name(name)}.label.png"

    def conf_path(self, name: str) -> Path:
        return self.folder / f"{_check_name(name)}.conf.png"

    # -- manifest -------------------------------------------------------------------------------------------------

    @classmethod
    def from_folder(cls, folder: str | Path) -> "OfflineLabelCache":
        """The finished cache in ``folder`` (``root / fingerprint[:16]``), its fingerprint read from the manifest.

        For labels that some other step wrote (e.g. an ensemble of models): they are used as they are.

        Raises:
            CacheEntryError: no readable manifest, or the folder is not named after its fingerprint.
        """
        folder = Path(folder).expanduser()
        path = folder / MANIFEST
        try:
            fingerprint = json.loads(path.read_text(encoding="utf-8")).get("fingerprint")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise CacheEntryError(f"offline pseudo-label cache {folder}: no readable {MANIFEST} ({e}); build the "
                                  "cache first") from None
        if not isinstance(fingerprint, str) or fingerprint[:16] != folder.name:
            raise CacheEntryError(f"{path}: fingerprint {fingerprint!r} does not match the folder name {folder.name!r}")
        return cls(folder.parent, fingerprint=fingerprint)

    def read_manifest(self) -> dict[str, tuple[int, int]] | None:
        """``{name: (H, W)}`` from a manifest of *this* fingerprint; None when absent, unreadable or stale."""
        path = self.manifest_path
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            logger.warning("%s: unreadable manifest (%s); the cache will be checked entry by entry", path, e)
            return None
        if not isinstance(data, dict) or data.get("fingerprint") != self.fingerprint:
            logger.warning("%s: manifest of another model (stale fingerprint); its entries are not used", path)
            return None
        entries = data.get("entries")
        try:
            return {str(k): (int(v[0]), int(v[1])) for k, v in entries.items()}
        except (AttributeError, TypeError, ValueError, IndexError, KeyError):
            logger.warning("%s: malformed manifest entries; the cache will be checked entry by entry", path)
            return None

    def write_manifest(self, entries: dict[str, tuple[int, int]], *, extra: dict | None = None) -> None:
        """Write the manifest (atomically, fsync'ed) listing ``entries`` ``{name: (H, W)}``."""
        data = {
            "format": _FORMAT,
            "version": _VERSION,
            "fingerprint": self.fingerprint,
            **({"info": extra} if extra else {}),
            "entries": {k: [int(v[0]), int(v[1])] for k, v in sorted(entries.items())},
        }
        atomic_write_bytes(self.manifest_path, json.dumps(data, indent=1).encode("utf-8"))

    def is_complete(self, names: Iterable[str]) -> bool:
        """True when this fingerprint's manifest lists every name and both files of each exist.

        The files are not decoded here (that is :meth:`get`'s and the build's job).
        """
        manifest = self.read_manifest()
        if manifest is None:
            return False
        for name in names:
            if name not in manifest or not self.label_path(name).is_file() or not self.conf_path(name).is_file():
                return False
        return True

    # -- entries --------------------------------------------------------------------------------------------------

    def _read_png(self, path: Path) -> np.ndarray:
        if not path.is_file():
            raise CacheEntryError(f"offline pseudo-label cache: missing file {path} (run the offline labelling first)")
        try:
            data = path.read_bytes()
            # A cut-off file lacks the closing IEND chunk: checked here because Pillow decodes a truncated PNG
            # (missing rows as zeros) when some library has set ImageFile.LOAD_TRUNCATED_IMAGES.
            if not data.startswith(_PNG_SIGNATURE) or not data.endswith(_PNG_END):
                raise CacheEntryError(f"{path}: truncated or not a PNG file (no PNG signature or IEND chunk)")
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                text = dict(getattr(img, "text", {}) or {})
                if img.mode != "L":
                    raise CacheEntryError(f"{path}: expected an 8-bit grayscale PNG, found mode {img.mode}")
                array = np.array(img, dtype=np.uint8)
        except CacheEntryError:
            raise
        except Exception as e:  # noqa: BLE001 - PIL raises many types for truncated / corrupt files
            raise CacheEntryError(f"{path}: unreadable or corrupt cache entry ({type(e).__name__}: {e})") from e
        if text.get(_TEXT_KEY) != self.fingerprint:
            raise CacheEntryError(
                f"{path}: cache entry written by another model (fingerprint {text.get(_TEXT_KEY)!r}, "
                f"expected {self.fingerprint!r})"
            )
        return array

    def get(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached ``(label, conf)`` of ``name``: both uint8 ``(H, W)`` CPU tensors.

        ``label`` holds class ids (255 = ignore), ``conf`` ``round(confidence * 255)``.

        Raises:
            CacheEntryError: a file is missing, unreadable, truncated, from another model, or the two differ in
                size; the message names the file.
        """
        label = self._read_png(self.label_path(name))
        conf = self._read_png(self.conf_path(name))
        if label.shape != conf.shape:
            raise CacheEntryError(
                f"{self.conf_path(name)}: size {conf.shape[1]}x{conf.shape[0]} differs from the label's "
                f"{label.shape[1]}x{label.shape[0]} (WxH) in {self.label_path(name)}"
            )
        return torch.from_numpy(label), torch.from_numpy(conf)

    def size_if_valid(self, name: str) -> tuple[int, int] | None:
        """``(H, W)`` of a valid entry, None when it is missing, corrupt or stale."""
        try:
            label, _ = self.get(name)
        except CacheEntryError:
            return None
        return int(label.shape[0]), int(label.shape[1])

    def _png_bytes(self, array: np.ndarray) -> bytes:
        info = PngImagePlugin.PngInfo()
        info.add_text(_TEXT_KEY, self.fingerprint)
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG", pnginfo=info, compress_level=1)
        return buf.getvalue()

    def put(self, name: str, label: torch.Tensor | np.ndarray, conf: torch.Tensor | np.ndarray) -> None:
        """Write one entry (two PNGs, each atomically). ``label`` and ``conf``: uint8 ``(H, W)``."""
        arrays = []
        for what, a in (("label", label), ("conf", conf)):
            a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
            if a.dtype != np.uint8 or a.ndim != 2:
                raise ValueError(f"OfflineLabelCache.put({name!r}): {what} must be uint8 (H, W), got {a.dtype} {a.shape}")
            arrays.append(np.ascontiguousarray(a))
        if arrays[0].shape != arrays[1].shape:
            raise ValueError(f"OfflineLabelCache.put({name!r}): label {arrays[0].shape} and conf {arrays[1].shape} differ")
        # No fsync per entry (thousands of files): a torn file after a power cut fails to decode and is rebuilt.
        atomic_write_bytes(self.label_path(name), self._png_bytes(arrays[0]), durable=False)
        atomic_write_bytes(self.conf_path(name), self._png_bytes(arrays[1]), durable=False)


# --------------------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------------------


def _dataset_names(dataset: Dataset) -> list[str] | None:
    names = getattr(dataset, "names", None)
    if names is None:
        return None
    names = list(names)
    return names if len(names) == len(dataset) else None  # type: ignore[arg-type]


def _model_device(model: nn.Module) -> torch.device | None:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return None


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda:0`` and ``cuda`` (the current device) count as the same."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def entropy_certainty(probs: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` probabilities -> ``(B, H, W)`` float32 certainty ``1 - H(p) / log C`` in ``[0, 1]``.

    ``p`` is renormalised first (a max-fused multi-scale map does not sum to 1); ``C == 1`` gives 1.
    """
    c = probs.shape[1]
    if c < 2:
        return torch.ones_like(probs[:, 0], dtype=torch.float32)
    p = probs.float()
    p = p / p.sum(1, keepdim=True).clamp_min(1e-12)
    return (1.0 + torch.special.xlogy(p, p).sum(1) / math.log(c)).clamp_(0.0, 1.0)


def mc_certainty(result: McDropoutResult, *, measure: str = "entropy") -> torch.Tensor:
    """``(B, H, W)`` float32 certainty in ``[0, 1]`` from MC-dropout statistics.

    ``"entropy"``: ``1 - H(mean_prob) / log C``; ``"variance"``: ``1 - 2 std``, the standard deviation across
    passes of the predicted class's probability (at most 1/2; the standard deviation rather than the variance,
    whose values crowd near 0 and would lose their order in a uint8 channel).
    """
    if measure == "entropy":
        return entropy_certainty(result.mean_prob)
    if measure == "variance":
        return (1.0 - 2.0 * result.label_variance.float().sqrt()).clamp_(0.0, 1.0)
    raise ValueError(f"mc_certainty: measure must be one of {', '.join(MEASURES)}, got {measure!r}")


FUSIONS = ("probs", "logits")


def _label_image(model: nn.Module, images: torch.Tensor, *, scales: Sequence[float], resize: tuple[int, int] | None,
                 amp_dtype: torch.dtype | None, uncertainty: str | None = None, mc_passes: int = 8,
                 measure: str = "entropy", generator: torch.Generator | None = None, fusion: str = "probs"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``(B, 3, H, W)`` on the device -> label uint8 ``(B, H, W)`` and conf uint8 ``(B, H, W)``.

    ``conf`` is the max of the fused probabilities, or with ``uncertainty`` the certainty averaged over scales.
    ``fusion="logits"`` fuses the upsampled logits by their maximum and then takes the softmax (DiGA's official
    code); ``"probs"`` the maximum of each scale's softmax (MC-dropout labels always fuse probabilities).
    """
    x = to_model_input(images)
    h, w = x.shape[-2:]
    base = (h, w) if resize is None else tuple(resize)
    fused: torch.Tensor | None = None
    certainty: torch.Tensor | None = None
    for s in scales:
        size = (max(1, round(base[0] * s)), max(1, round(base[1] * s)))
        xs = x if size == (h, w) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        amp_ctx = (torch.autocast(device_type=x.device.type, dtype=amp_dtype) if amp_dtype is not None
                   else contextlib.nullcontext())
        if uncertainty == "mc_dropout":  # T passes of the classifier on features computed once, at (H, W)
            with amp_ctx:
                result = mc_dropout(model, xs, passes=mc_passes, generator=generator, out_size=(h, w))
            probs, cert = result.mean_prob, mc_certainty(result, measure=measure)
        else:
            with amp_ctx:
                logits = model(xs)
            logits = F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False)
            if fusion == "logits":
                fused_logits = logits if fused is None else torch.maximum(fused_logits, logits)
                fused = torch.softmax(fused_logits, dim=1)  # after every scale: the softmax of the max so far
            probs = torch.softmax(logits, dim=1)
            cert = entropy_certainty(probs) if uncertainty == "entropy" else None
        if uncertainty == "mc_dropout" or fusion == "probs":
            fused = probs if fused is None else torch.maximum(fused, probs)
        if cert is not None:
            certainty = cert if certainty is None else certainty + cert
    assert fused is not None
    conf, label = fused.max(dim=1)
    if certainty is not None:
        conf = certainty / len(scales)
    return label.to(torch.uint8), torch.round(conf * 255.0).clamp_(0, 255).to(torch.uint8)


@torch.inference_mode()
def build_offline_labels(
    model: nn.Module,
    dataset: Dataset,
    cache: OfflineLabelCache,
    *,
    device: str | torch.device,
    batch_size: int = 4,
    scales: Sequence[float] = (1.0,),
    amp: str = "fp32",
    num_workers: int = 0,
    progress: bool = False,
    resize: tuple[int, int] | None = None,
    uncertainty: str | None = None,
    mc_passes: int = 8,
    measure: str = "entropy",
    fusion: str = "probs",
) -> None:
    """Label every image of ``dataset`` with ``model`` and store the labels in ``cache``.

    For each image (uint8 ``(3, H, W)``, at its native size) and each scale ``s``, the input (resized to
    ``resize`` ``(H', W')`` first when given) is rescaled by ``s`` and the logits are upsampled bilinearly to
    ``(H, W)``; the scales are fused by the element-wise **maximum**, of the softmax probabilities
    (``fusion="probs"``; not renormalised) or of the logits, followed by one softmax (``fusion="logits"``, DiGA's
    official code). ``label = argmax`` and ``conf = max`` of the fused map, stored as uint8 PNGs at ``(H, W)``.

    Valid entries already in the cache are skipped (an interrupted build resumes); missing, corrupt or stale
    ones are (re)computed. The manifest is written at the end. The model is put in eval mode (and moved to
    ``device`` when it is elsewhere) and restored afterwards.

    Args:
        dataset: samples ``{"image": uint8 (3, H, W), "name": str}`` (built with ``with_labels=False``, no random
            transform). Images of different sizes are fine: a batch of mixed sizes is labelled image by image.
        device: where the model runs.
        batch_size, num_workers: of the DataLoader.
        scales: the input scales (e.g. ``(1.0, 0.5)``).
        amp: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast for the forward pass; softmax in float32).
        progress: show a progress bar.
        resize: optional ``(H', W')`` the model sees at scale 1 (labels are still stored at ``(H, W)``).
        uncertainty: None (``conf`` = max fused probability), ``"entropy"`` (``conf`` = ``1 - H(p) / log C`` of
            each scale's prediction, averaged over the scales) or ``"mc_dropout"`` (each scale's probabilities are
            the mean of ``mc_passes`` MC-dropout passes of the classifier, :func:`sfdaseg.uncertainty.mc_dropout`,
            and ``conf`` is :func:`mc_certainty` by ``measure``, averaged over the scales). The dropout masks are
            drawn from a generator seeded with 0 for every batch, so a rebuild gives the same labels.
    """
    if uncertainty is not None and uncertainty not in UNCERTAINTIES:
        raise ValueError(f"build_offline_labels: uncertainty must be None or one of {', '.join(UNCERTAINTIES)}, "
                         f"got {uncertainty!r}")
    if uncertainty == "mc_dropout" and (isinstance(mc_passes, bool) or not isinstance(mc_passes, int)
                                        or mc_passes < 1 or measure not in MEASURES):
        raise ValueError(f"build_offline_labels: mc_passes must be a positive integer and measure one of "
                         f"{', '.join(MEASURES)}, got {mc_passes!r} and {measure!r}")
    if amp not in AMP_DTYPES:
        raise ValueError(f"build_offline_labels: amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
    if fusion not in FUSIONS:
        raise ValueError(f"build_offline_labels: fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
    scales = tuple(float(s) for s in scales)
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"build_offline_labels: scales must be positive numbers, got {scales}")
    device = torch.device(device)
    amp_dtype = AMP_DTYPES[amp]

    entries: dict[str, tuple[int, int]] = dict(cache.read_manifest() or {})
    names = _dataset_names(dataset)
    if names is not None:
        todo = []
        for i, name in enumerate(names):
            size = cache.size_if_valid(name)
            if size is None:
                todo.append(i)
            else:
                entries[name] = size
        subset: Dataset = Subset(dataset, todo)
        check_each = False
    else:  # no cheap name list: load every sample and skip the valid ones after loading
        todo = list(range(len(dataset)))  # type: ignore[arg-type]
        subset = dataset
        check_each = True
    if not todo:
        logger.info("offline pseudo-labels: all %d entries of %s are valid; nothing to do", len(entries), cache.folder)
        cache.write_manifest(entries)
        return
    logger.info("offline pseudo-labels: labelling %d image(s) into %s", len(todo), cache.folder)

    was_training = model.training
    old_device = _model_device(model)
    move = old_device is not None and not _same_device(old_device, device)
    if move:
        model.to(device)
    model.eval()
    try:
        loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            collate_fn=collate, pin_memory=device.type == "cuda")
        bar = _progress(total=len(todo), enabled=progress)
        for batch in loader:
            images, batch_names = batch["image"], batch["name"]
            groups = [images] if isinstance(images, torch.Tensor) else [im[None] for im in images]
            offset = 0
            for group in groups:
                group_names = batch_names[offset: offset + group.shape[0]]
                offset += group.shape[0]
                if check_each:
                    keep = [j for j, n in enumerate(group_names) if cache.size_if_valid(n) is None]
                    for j, n in enumerate(group_names):
                        if j not in keep:
                            entries[n] = (int(group.shape[-2]), int(group.shape[-1]))
                    if not keep:
                        continue
                    group, group_names = group[keep], [group_names[j] for j in keep]
                generator = None
                if uncertainty == "mc_dropout":
                    generator = torch.Generator(device=device).manual_seed(0)
                label, conf = _label_image(model, group.to(device, non_blocking=True), scales=scales,
                                           resize=resize, amp_dtype=amp_dtype, uncertainty=uncertainty,
                                           mc_passes=mc_passes, measure=measure, generator=generator,
                                           fusion=fusion)
                label, conf = label.cpu(), conf.cpu()  # I/O: the labels go to disk
                for j, name in enumerate(group_names):
                    cache.put(name, label[j], conf[j])
                    entries[name] = (int(label.shape[-2]), int(label.shape[-1]))
            bar.update(len(batch_names))
        bar.close()
    finally:
        model.train(was_training)
        if move:
            model.to(old_device)
    info: dict[str, Any] = {"scales": list(scales), "resize": list(resize) if resize else None, "fusion": fusion}
    if uncertainty is not None:
        info["conf"] = {"uncertainty": uncertainty, **({"mc_passes": mc_passes, "measure": measure}
                                                       if uncertainty == "mc_dropout" else {})}
    cache.write_manifest(entries, extra=info)


def _progress(*, total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="offline pseudo-labels", unit="img", disable=not enabled)


# --------------------------------------------------------------------------------------------------------------
# Reading in the training pipeline
# --------------------------------------------------------------------------------------------------------------


class WithOfflineLabels(Dataset):
    """A dataset whose samples carry their cached offline pseudo-labels.

    ``dataset[i]`` (built with ``with_labels=False`` and *no* transform, so the image is at its native size)
    gets ``"pl_label"`` and ``"pl_conf"`` (uint8 ``(H, W)``, from :meth:`OfflineLabelCache.get`), then
    ``transform(sample)``; the paired transforms of :mod:`sfdaseg.data.transforms` move both with the image
    like a mask (padding 255: ignore).

    Args:
        dataset: the base dataset.
        cache: a cache built for it by :func:`build_offline_labels`.
        transform: applied to the sample after the pseudo-labels are added.
        check: when the base dataset lists its names, fail now (naming the cache folder) if the cache lacks any.

    Raises (from ``__getitem__``):
        CacheEntryError: the entry is missing or corrupt, or its size differs from the image's.
    """

    def __init__(self, dataset: Dataset, cache: OfflineLabelCache, *, transform: Any = None,
                 check: bool = True) -> None:
        self.dataset = dataset
        self.cache = cache
        self.transform = transform
        if check:
            names = _dataset_names(dataset)
            if names is not None and not cache.is_complete(names):
                raise CacheEntryError(
                    f"offline pseudo-label cache {cache.folder} does not hold every image of the dataset (or its "
                    "manifest is missing or of another model): run build_offline_labels first"
                )

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    @property
    def names(self) -> list[str] | None:
        return _dataset_names(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.dataset[index])
        name = sample["name"]
        label, conf = self.cache.get(name)
        h, w = sample["image"].shape[-2:]
        if tuple(label.shape) != (h, w):
            raise CacheEntryError(
                f"{self.cache.label_path(name)}: cached pseudo-labels are {label.shape[1]}x{label.shape[0]} (WxH) "
                f"but the image {name!r} is {w}x{h}; the dataset must be read at native size without a transform "
                "(or the cache is from other images: delete it to rebuild)"
            )
        sample["pl_label"] = label
        sample["pl_conf"] = conf
        return self.transform(sample) if self.transform is not None else sample
