"""Dataset readers: one per official layout, plus a plain folder dataset.

A dataset is named ``KIND:ROOT[:SPLIT]`` (``gta5:/data/gta5``, ``cityscapes:/data/cs:val``,
``acdc:/data/acdc:night/val``, ``folder:/data/mine``, ``synthetic:target:val``); :func:`build_dataset` parses
the name and calls the reader registered under ``KIND`` in :data:`DATASETS` (a plain dict).

Every reader returns a :class:`SegmentationDataset`, a map-style dataset whose samples are dicts::

    {"image": uint8 (3, H, W) RGB, "mask": uint8 (H, W) class index or 255, "name": str}

``"mask"`` is absent when the dataset was built with ``with_labels=False``: then the label files are never
listed, checked or opened (adaptation reads target images only). ``"name"`` is the sample's path relative to
the reader's image folder, without extension (each reader's docstring gives an example); it is unique within
the dataset and keys the pseudo-label cache and prediction files.

Label files hold raw ids; they are mapped to class indices through one numpy lookup table per dataset
(:func:`sfdaseg.data.classes.make_lut`). For the official datasets every raw id outside the id map becomes
255 (ignore). For a folder dataset without an ``id_map`` a value outside ``[0, num_classes)`` and the ignore
value is an error naming the file and the offending values.

Bad data raises :class:`DatasetError` (a ``ValueError``) naming the file or folder and what was expected.
With ``on_error="skip"`` a reader instead warns (:class:`DatasetWarning`) and drops images without a label
file when it is built, and, when a sample cannot be read (unreadable, truncated or empty file, image and
mask of different sizes, bad label values), returns the next readable sample (deterministically: index
``i + 1``, ``i + 2``, ... wrapping around). A missing root, a missing required folder or an empty folder is
always an error.
"""

from __future__ import annotations

import difflib
import inspect
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from sfdaseg.data.classes import (
    CITYSCAPES19,
    IGNORE_INDEX,
    LABELID_TO_TRAINID,
    SYNTHIA_TO_TRAINID,
    ClassSpec,
    make_lut,
)

__all__ = [
    "DATASETS",
    "DatasetError",
    "DatasetSpec",
    "DatasetWarning",
    "worker_died",
    "Item",
    "LabelMapper",
    "SegmentationDataset",
    "acdc_dataset",
    "build_dataset",
    "cityscapes_dataset",
    "darkzurich_dataset",
    "folder_dataset",
    "gta5_dataset",
    "ColorMapper",
    "FolderClasses",
    "load_folder_classes",
    "nthu_dataset",
    "parse_dataset_spec",
    "synthia_dataset",
]

ON_ERROR = ("raise", "skip")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# Formats torchvision.io.decode_image reads; anything else (BMP) goes through Pillow.
_TORCHVISION_FORMATS = (".png", ".jpg", ".jpeg", ".webp", ".gif")
_LUT_SIZE = 65536  # covers 8- and 16-bit label PNGs
_INVALID = -1  # LUT entry for a raw value that is an error (folder datasets without id_map)


class DatasetError(ValueError):
    """Bad dataset input: names the file or folder and what was expected."""


class DatasetWarning(UserWarning):
    """A sample or file skipped because of ``on_error="skip"``."""


def worker_died(e: RuntimeError) -> RuntimeError:
    """A DataLoader's "worker exited unexpectedly" error with what to do about it (other errors unchanged)."""
    if "DataLoader worker" not in str(e):
        return e
    return RuntimeError(f"{e}. Rerun with data.num_workers=0 to see the error in the main process; a worker killed "
                        "by the system is often out of memory (lower data.num_workers, data.batch_size or data.crop)")


# ----------------------------------------------------------------------------------------------------------
# Items, label mapping and decoding
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One sample on disk: image file, label file (``None`` when labels are not read) and unique name."""

    image: Path
    mask: Path | None
    name: str


class LabelMapper:
    """Raw label PNG values -> class indices through one lookup table.

    Args:
        lut: int16 array of 65536 entries: a class index, 255 (ignore) or -1 (a value that is an error).
        channel: ``None`` for single-channel (grayscale or palette) label images, where more channels are an
            error; an integer to read that channel of a multi-channel image (SYNTHIA keeps its class id in R).
        description: what the valid values are, for error messages.
    """

    def __init__(self, lut: np.ndarray, *, channel: int | None = None, description: str = "") -> None:
        if lut.shape != (_LUT_SIZE,):
            raise ValueError(f"LabelMapper.lut: expected shape ({_LUT_SIZE},), got {lut.shape}")
        self.lut = lut.astype(np.int16)
        self.channel = channel
        self.description = description
        self.has_invalid = bool((self.lut == _INVALID).any())

    @classmethod
    def from_id_map(cls, id_map: Mapping[int, int], *, channel: int | None = None) -> "LabelMapper":
        """Ids in ``id_map`` map to their class, every other id to 255."""
        lut = make_lut(id_map, size=_LUT_SIZE, ignore_index=IGNORE_INDEX).astype(np.int16)
        return cls(lut, channel=channel)

    @classmethod
    def strict(cls, num_classes: int, *, ignore_value: int = IGNORE_INDEX) -> "LabelMapper":
        """Values ``0..num_classes-1`` are classes, ``ignore_value`` becomes 255, anything else is an error."""
        lut = np.full(_LUT_SIZE, _INVALID, dtype=np.int16)
        lut[:num_classes] = np.arange(num_classes, dtype=np.int16)
        lut[ignore_value] = IGNORE_INDEX
        return cls(lut, description=f"class indices 0..{num_classes - 1} or the ignore value {ignore_value}")

    def __call__(self, raw: torch.Tensor, path: Path) -> torch.Tensor:
        """Map a decoded label image ``(C, H, W)`` (uint8 or uint16) to a uint8 mask ``(H, W)``."""
        if self.channel is None:
            if raw.shape[0] not in (1, 2):  # 2 = grayscale + alpha; the alpha channel is not a label
                raise DatasetError(
                    f"{path}: expected a single-channel (grayscale or palette) label PNG, got {raw.shape[0]} "
                    "channels (colour-coded masks are not supported; store class indices)"
                )
            channel = 0
        else:
            if raw.shape[0] <= self.channel:
                raise DatasetError(
                    f"{path}: expected a label image with channel {self.channel}, got {raw.shape[0]} channels"
                )
            channel = self.channel
        plane = raw[channel]
        # uint16 tensors support few ops (and no numpy conversion on older torch); int32 indexes the LUT fine.
        values = plane.numpy() if plane.dtype == torch.uint8 else plane.to(torch.int32).numpy()
        mapped = self.lut[values]
        if self.has_invalid:
            bad = mapped == _INVALID
            if bad.any():
                offending = np.unique(values[bad])
                shown = ", ".join(str(int(v)) for v in offending[:20]) + (" ..." if offending.size > 20 else "")
                raise DatasetError(
                    f"{path}: label values outside the class spec: {shown} (expected {self.description})"
                )
        return torch.from_numpy(mapped.astype(np.uint8))


def _read_bytes(path: Path) -> torch.Tensor:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read file ({e})") from e
    if not data:
        raise DatasetError(f"{path}: zero-byte file, expected an image")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _decode_image(data: torch.Tensor, mode: str) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    # torchvision 0.29 deprecates its image codecs in favour of TorchCodec and warns on *every* call; the
    # codecs are what we need (16-bit PNGs included) and are tested, so keep the per-sample warning out of logs.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")
        return decode_image(data, mode=getattr(ImageReadMode, mode))


def decode_rgb(path: Path) -> torch.Tensor:
    """Decode an image file to RGB ``uint8 (3, H, W)``; raises :class:`DatasetError` naming the file."""
    try:
        if path.suffix.lower() in _TORCHVISION_FORMATS:
            image = _decode_image(_read_bytes(path), "RGB")
        else:
            image = _decode_with_pil(path, "RGB")
    except DatasetError:
        raise
    except Exception as e:  # torchvision raises RuntimeError, Pillow OSError / UnidentifiedImageError
        raise DatasetError(f"{path}: cannot decode image, the file is unreadable or truncated ({e})") from e
    if image.dtype != torch.uint8:  # a 16-bit PNG photo: keep the 8 most significant bits
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    return image


def decode_label(path: Path) -> torch.Tensor:
    """Decode a label PNG unchanged: ``(C, H, W)`` uint8 or uint16 (16-bit PNGs keep their 16 bits)."""
    try:
        if path.suffix.lower() in _TORCHVISION_FORMATS:
            return _decode_image(_read_bytes(path), "UNCHANGED")
        return _decode_with_pil(path, None)
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(f"{path}: cannot decode label image, the file is unreadable or truncated ({e})") from e


def _decode_with_pil(path: Path, mode: str | None) -> torch.Tensor:
    from PIL import Image

    if path.stat().st_size == 0:
        raise DatasetError(f"{path}: zero-byte file, expected an image")
    with Image.open(path) as im:
        im.load()  # Pillow decodes lazily; force it here so that truncation is an error now
        if mode is not None:
            im = im.convert(mode)
        array = np.array(im)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


# ----------------------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------------------


class SegmentationDataset(Dataset):
    """Map-style dataset over a list of :class:`Item`.

    ``dataset[i]`` returns ``{"image": uint8 (3, H, W), "mask": uint8 (H, W), "name": str}`` (no ``"mask"``
    when ``with_labels=False``), then ``transform(sample)`` when a transform is given.

    Attributes:
        classes: the class space of the masks (``None`` only for an unlabelled folder without a class file).
        items: the samples on disk.
        names: the sample names, in order.
        protocol: the evaluation protocol usually reported for this dataset (19, 16 or 13 classes), or None.
        kind, root, split: where it came from (for reports).
    """

    def __init__(
        self,
        items: Sequence[Item],
        *,
        classes: ClassSpec | None,
        label_mapper: LabelMapper | None,
        with_labels: bool = True,
        transform: Callable[[dict], dict] | None = None,
        on_error: str = "raise",
        kind: str = "",
        root: str | Path = "",
        split: str | None = None,
        protocol: int | None = None,
    ) -> None:
        _check_on_error(on_error)
        if not items:
            raise DatasetError(f"{kind or 'dataset'} at {root}: no samples")
        if with_labels and label_mapper is None:
            raise ValueError("SegmentationDataset: with_labels=True needs a label_mapper")
        if with_labels and any(it.mask is None for it in items):
            missing = next(it for it in items if it.mask is None)
            raise ValueError(f"SegmentationDataset: with_labels=True but {missing.image} has no label file")
        names = [it.name for it in items]
        if len(set(names)) != len(names):
            seen: set[str] = set()
            dup = sorted({n for n in names if n in seen or seen.add(n)})
            raise DatasetError(
                f"{kind or 'dataset'} at {root}: sample names must be unique (they name cached pseudo-labels "
                f"and predictions), repeated: {dup[:10]} (e.g. the same file stem with two extensions)"
            )
        self.items = list(items)
        self.classes = classes
        self.label_mapper = label_mapper
        self.with_labels = with_labels
        self.transform = transform
        self.on_error = on_error
        self.kind = kind
        self.root = str(root)
        self.split = split
        self.protocol = protocol
        self._bad: set[int] = set()  # indices found unreadable in this process (skip mode)

    @property
    def names(self) -> list[str]:
        return [it.name for it in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        split = f":{self.split}" if self.split else ""
        return (f"{type(self).__name__}({self.kind}:{self.root}{split}, {len(self)} samples, "
                f"with_labels={self.with_labels})")

    def load(self, index: int) -> dict[str, Any]:
        """Read sample ``index`` without transform and without skipping; raises :class:`DatasetError`."""
        item = self.items[index]
        image = decode_rgb(item.image)
        sample: dict[str, Any] = {"image": image}
        if self.with_labels:
            assert item.mask is not None and self.label_mapper is not None
            mask = self.label_mapper(decode_label(item.mask), item.mask)
            if tuple(mask.shape) != tuple(image.shape[1:]):
                raise DatasetError(
                    f"image and mask sizes differ: {item.image} is {image.shape[2]}x{image.shape[1]} (WxH) but "
                    f"{item.mask} is {mask.shape[1]}x{mask.shape[0]}; expected the same size "
                    "(on_error='skip' skips such samples)"
                )
            sample["mask"] = mask
        sample["name"] = item.name
        return sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.items)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} samples")
        index %= n
        for step in range(n):
            j = (index + step) % n
            if j in self._bad:
                continue
            try:
                sample = self.load(j)
            except DatasetError as e:
                if self.on_error == "raise":
                    raise
                self._bad.add(j)
                warnings.warn(f"{e}; skipping to the next sample", DatasetWarning, stacklevel=2)
                continue
            return self.transform(sample) if self.transform is not None else sample
        raise DatasetError(f"{self.kind or 'dataset'} at {self.root}: no readable sample left (all {n} failed)")


# ----------------------------------------------------------------------------------------------------------
# Listing helpers
# ----------------------------------------------------------------------------------------------------------


def _check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error: expected one of {list(ON_ERROR)}, got {on_error!r}")


def _require_dir(path: Path, what: str, layout: str) -> Path:
    if not path.is_dir():
        kind = "is not a folder" if path.exists() else "does not exist"
        raise DatasetError(f"{path} {kind}: expected {what}. Expected layout: {layout}")
    return path


def _list_files(folder: Path, *, suffixes: Iterable[str], layout: str, recursive: bool = True) -> list[Path]:
    """Files under ``folder`` whose names end with one of ``suffixes`` (case-insensitive), sorted."""
    suffixes = tuple(s.lower() for s in suffixes)
    walk = folder.rglob("*") if recursive else folder.iterdir()
    candidates = sorted(
        p for p in walk
        if p.name.lower().endswith(suffixes)
        # hidden files and folders (.ipynb_checkpoints, macOS ._ files) are not samples
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    files = [p for p in candidates if p.is_file()]
    dropped = [p for p in candidates if not p.is_file() and not p.is_dir()]  # broken links, sockets, ...
    if dropped:
        names = ", ".join(p.name for p in dropped[:5]) + (" ..." if len(dropped) > 5 else "")
        warnings.warn(f"{folder}: {len(dropped)} entr{'y' if len(dropped) == 1 else 'ies'} with an image suffix "
                      f"{'is' if len(dropped) == 1 else 'are'} not a readable file (a broken link?), left out: {names}",
                      DatasetWarning, stacklevel=3)
    if not files:
        raise DatasetError(f"{folder}: no files ending with {'/'.join(suffixes)} found. Expected layout: {layout}")
    return files


def _pair(
    images: Sequence[Path],
    *,
    mask_for: Callable[[Path], Path] | None,
    name_for: Callable[[Path], str],
    on_error: str,
    what: str,
) -> list[Item]:
    """Pair each image with its label file; ``mask_for=None`` reads images only (labels never listed)."""
    if mask_for is None:
        return [Item(image=p, mask=None, name=name_for(p)) for p in images]
    items, missing = [], []
    for p in images:
        m = mask_for(p)
        if m.is_file():
            items.append(Item(image=p, mask=m, name=name_for(p)))
        else:
            missing.append((p, m))
    if missing:
        shown = "; ".join(f"{p} -> expected {m}" for p, m in missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        msg = f"{len(missing)} image(s) of {what} have no label file: {shown}{more}"
        if on_error == "raise":
            raise DatasetError(msg + "; pass on_error='skip' to drop them, or with_labels=False to read images only")
        warnings.warn(msg + "; dropping them", DatasetWarning, stacklevel=3)
        if not items:
            raise DatasetError(f"{what}: no image has a label file")
    return items


def _strip_suffix(name: str, suffix: str) -> str:
    return name[: -len(suffix)] if suffix and name.lower().endswith(suffix.lower()) else name


def _rel_name(path: Path, base: Path) -> str:
    """Relative path without extension, with '/' separators."""
    return path.relative_to(base).with_suffix("").as_posix()


def _filter_by_list(images: list[Path], list_file: Path, img_dir: Path, what: str) -> list[Path]:
    """Keep the images listed, one file name or stem (relative to the image folder) per line, in ``list_file``."""
    wanted = [ln.strip() for ln in list_file.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    keys = {Path(w).with_suffix("").as_posix() for w in wanted}
    kept = [p for p in images if _rel_name(p, img_dir) in keys]
    if not kept:
        raise DatasetError(f"{list_file}: none of its {len(wanted)} entries matches an image of {what}")
    return kept


def _split_parts(split: str | None) -> list[str]:
    return [p for p in re.split(r"[/\\]", split.strip())] if split else []


def _match_choice(value: str, choices: Sequence[str], what: str, spec_help: str) -> str:
    """Case-insensitive choice, with a close-match suggestion in the error."""
    for c in choices:
        if c.lower() == value.lower():
            return c
    lower = {c.lower(): c for c in choices}
    close = difflib.get_close_matches(value.lower(), list(lower), n=1)
    hint = f"; did you mean {lower[close[0]]!r}?" if close else ""
    raise DatasetError(f"{what}: unknown {value!r}, expected one of {list(choices)}{hint} ({spec_help})")


def _make(
    items: list[Item],
    *,
    kind: str,
    root: Path,
    split: str | None,
    with_labels: bool,
    transform,
    on_error: str,
    mapper: LabelMapper | None,
    classes: ClassSpec | None = CITYSCAPES19,
    protocol: int | None = 19,
) -> SegmentationDataset:
    return SegmentationDataset(
        items, classes=classes, label_mapper=mapper if with_labels else None, with_labels=with_labels,
        transform=transform, on_error=on_error, kind=kind, root=root, split=split, protocol=protocol,
    )


def _root(root: str | Path, kind: str, layout: str) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        state = "is not a folder" if path.exists() else "does not exist"
        raise DatasetError(f"{kind} root {path} {state}. Expected layout: {layout}")
    return path


# ----------------------------------------------------------------------------------------------------------
# Readers of the official layouts
# ----------------------------------------------------------------------------------------------------------

def _flat_dataset(
    root: str | Path,
    *,
    kind: str,
    image_sub: str,
    label_sub: str,
    layout: str,
    mapper: LabelMapper,
    protocol: int,
    split: str | None,
    with_labels: bool,
    transform: Callable[[dict], dict] | None,
    on_error: str,
) -> SegmentationDataset:
    """``ROOT/<image_sub>/X.png`` paired with ``ROOT/<label_sub>/X.png``; split ``all`` or a list file."""
    _check_on_error(on_error)
    base = _root(root, kind, layout)
    img_dir = _require_dir(base / image_sub, f"the {kind} {image_sub} folder", layout)
    images = _list_files(img_dir, suffixes=(".png",), layout=layout)
    if split and split != "all":
        list_file = base / f"{split}.txt"
        if not list_file.is_file():
            raise DatasetError(
                f"{kind} split {split!r}: expected 'all' or a list file {list_file}, which does not exist"
            )
        images = _filter_by_list(images, list_file, img_dir, f"{kind} at {base}")
    mask_for = None
    if with_labels:
        lbl_dir = _require_dir(base / label_sub, f"the {kind} {label_sub} folder", layout)
        mask_for = lambda p: lbl_dir / p.relative_to(img_dir)  # noqa: E731
    items = _pair(images, mask_for=mask_for, name_for=lambda p: _rel_name(p, img_dir), on_error=on_error,
                  what=f"{kind} at {base}")
    return _make(items, kind=kind, root=base, split=split or "all", with_labels=with_labels, transform=transform,
                 on_error=on_error, mapper=mapper, protocol=protocol)


_GTA5_LAYOUT = "ROOT/images/00001.png and ROOT/labels/00001.png (Cityscapes labelIds)"


def gta5_dataset(
    root: str | Path,
    *,
    split: str | None = None,
    with_labels: bool = True,
    transform: Callable[[dict], dict] | None = None,
    on_error: str = "raise",
) -> SegmentationDataset:
    """GTA5 (Playing for Data): ``images/*.png`` and ``labels/*.png`` holding Cityscapes labelIds.

    Labels are palette PNGs whose indices are labelIds; they map to the 19 trainIds (other ids -> 255).
    ``split``: ``all`` (default) or the name of a list file ``ROOT/<split>.txt`` (one file name or stem per
    line, as the ``gta5_list`` files of public code bases). Names: ``00001``.
    """
    return _flat_dataset(root, kind="gta5", image_sub="images", label_sub="labels", layout=_GTA5_LAYOUT,
                         mapper=LabelMapper.from_id_map(LABELID_TO_TRAINID), protocol=19, split=split,
                         with_labels=with_labels, transform=transform, on_error=on_error)


_SYNTHIA_LAYOUT = "ROOT/RGB/0000000.png and ROOT/GT/LABELS/0000000.png (16-bit PNG, class id in the first channel)"


def synthia_dataset(
    root: str | Path,
    *,
    split: str | None = None,
    with_labels: bool = True,
    transform: Callable[[dict], dict] | None = None,
    on_error: str = "raise",
) -> SegmentationDataset:
    """SYNTHIA-RAND-CITYSCAPES: ``RGB/*.png`` and ``GT/LABELS/*.png``.

    The label PNGs are 16-bit RGB with the SYNTHIA class id in the first (R) channel (the second holds
    instance ids); they are decoded at full 16-bit depth by torchvision (uint16, torchvision >= 0.21; Pillow
    would keep only the high byte) and mapped with ``SYNTHIA_TO_TRAINID`` to the 19-trainId space (no
    terrain, truck or train; reported with the 16-class protocol).
    ``split``: ``all`` (default) or a list file ``ROOT/<split>.txt``. Names: ``0000000``.
    """
    return _flat_dataset(root, kind="synthia", image_sub="RGB", label_sub="GT/LABELS", layout=_SYNTHIA_LAYOUT,
                         mapper=LabelMapper.from_id_map(SYNTHIA_TO_TRAINID, channel=0), protocol=16, split=split,
                         with_labels=with_labels, transform=transform, on_error=on_error)


_CITYSCAPES_LAYOUT = (
    "ROOT/leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png and "
    "ROOT/gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png"
)


def cityscapes_dataset(
    root: str | Path,
    *,
    split: str | None = None,
    with_labels: bool = True,
    transform: Callable[[dict], dict] | None = None,
    on_error: str = "raise",
) -> SegmentationDataset:
    """Cityscapes fine annotations: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with
    ``gtFine/<split>/<city>/*_gtFine_labelIds.png`` (labelIds -> 19 trainIds).

    ``split``: ``train`` (default), ``val`` or ``test`` (whose public labels are all void, hence 255).
    Names: ``frankfurt/frankfurt_000000_000294_leftImg8bit``.
    """
    _check_on_error(on_error)
    split = _match_choice(split or "train", ("train", "val", "test"), "cityscapes split", "use cityscapes:ROOT:val")
    base = _root(root, "cityscapes", _CITYSCAPES_LAYOUT)
    img_dir = _require_dir(base / "leftImg8bit" / split, f"the Cityscapes {split} images", _CITYSCAPES_LAYOUT)
    images = _list_files(img_dir, suffixes=("_leftImg8bit.png",), layout=_CITYSCAPES_LAYOUT)
    mask_for = None
    if with_labels:
        gt_dir = _require_dir(base / "gtFine" / split, f"the Cityscapes {split} fine labels", _CITYSCAPES_LAYOUT)

        def mask_for(p: Path) -> Path:
            stem = _strip_suffix(p.name, "_leftImg8bit.png")
            return gt_dir / p.parent.relative_to(img_dir) / f"{stem}_gtFine_labelIds.png"

    items = _pair(images, mask_for=mask_for, name_for=lambda p: _rel_name(p, img_dir), on_error=on_error,
                  what=f"cityscapes {split} at {base}")
    return _make(items, kind="cityscapes", root=base, split=split, with_labels=with_labels, transform=transform,
                 on_error=on_error, mapper=LabelMapper.from_id_map(LABELID_TO_TRAINID), protocol=19)


NTHU_CITIES = ("Rome", "Rio", "Tokyo", "Taipei")
_NTHU_LAYOUT = (
    "ROOT/<City>/Images/{Train,Test}/pano_<id>.png (or .jpg) and ROOT/<City>/Labels/Test/pano_<id>_eval.png "
    f"(Cityscapes labelIds), cities {', '.join(NTHU_CITIES)}"
)


def nthu_dataset(
    root: str | Path,
    *,
    split: str | None = None,
    with_labels: bool = True,
    transform: Callable[[dict], dict] | None = None,
    on_error: str = "raise",
) -> SegmentationDataset:
    """NTHU cross-city (Chen et al., ICCV 2017): ``<City>/Images/{Train,Test}``, ``<City>/Labels/Test``.

    Layout as distributed (``NTHU_Datasets``) and read by public loaders (e.g. MaxSquareLoss'
    ``crosscity_Dataset.py``): images ``<City>/Images/Test/pano_00368_0_0.png`` (``.jpg`` also accepted), labels
    ``<City>/Labels/Test/pano_00368_0_0_eval.png``. The ``*_eval.png`` labels hold **Cityscapes labelIds** (not
    trainIds): those loaders map them with the labelId -> trainId table and then keep the 13 shared classes.
    We map them to the 19 trainIds like Cityscapes; the 13-class protocol (``PROTOCOLS[13]``, the dataset's
    ``protocol``) selects the evaluated classes. The Train split has no labels: read it with
    ``with_labels=False`` (or place ``Labels/Train`` yourself).

    ``split``: ``<City>/<train|test>`` (``Rome/test``), ``<City>`` (= its train split), or ``train``/``test``
    for every city folder present; default ``train`` over all cities. Names: ``Rome/pano_00368_0_0``.
    """
    _check_on_error(on_error)
    base = _root(root, "nthu", _NTHU_LAYOUT)
    present = sorted(p.name for p in base.iterdir() if p.is_dir() and (p / "Images").is_dir())
    if not present:
        raise DatasetError(f"{base}: no city folder with an Images/ subfolder found. Expected layout: {_NTHU_LAYOUT}")
    parts = _split_parts(split) or ["train"]
    help_ = "split like Rome/test, Rome/train, Rome or test"
    if len(parts) == 2:
        cities, phase = [_match_choice(parts[0], present, f"nthu city under {base}", help_)], parts[1]
    elif len(parts) == 1 and parts[0].lower() in ("train", "test"):
        cities, phase = present, parts[0]
    elif len(parts) == 1:
        cities, phase = [_match_choice(parts[0], present, f"nthu city under {base}", help_)], "train"
    else:
        raise DatasetError(f"nthu split {split!r}: expected {help_}")
    phase = _match_choice(phase, ("Train", "Test"), "nthu split", help_)
    items: list[Item] = []
    for city in cities:
        img_dir = _require_dir(base / city / "Images" / phase, f"the NTHU {city} {phase} images", _NTHU_LAYOUT)
        images = _list_files(img_dir, suffixes=(".png", ".jpg", ".jpeg"), layout=_NTHU_LAYOUT)
        mask_for = None
        if with_labels:
            lbl_dir = _require_dir(
                base / city / "Labels" / phase,
                f"the NTHU {city} {phase} labels (only Test is labelled; read Train with with_labels=False)",
                _NTHU_LAYOUT,
            )
            mask_for = lambda p, d=lbl_dir, i=img_dir: d / p.parent.relative_to(i) / f"{p.stem}_eval.png"  # noqa: E731
        items += _pair(images, mask_for=mask_for, name_for=lambda p, c=city, i=img_dir: f"{c}/{_rel_name(p, i)}",
                       on_error=on_error, what=f"nthu {city}/{phase} at {base}")
    split_name = "/".join([cities[0], phase.lower()]) if len(cities) == 1 else phase.lower()
    return _make(items, kind="nthu", root=base, split=split_name, with_labels=with_labels, transform=transform,
                 on_error=on_error, mapper=LabelMapper.from_id_map(LABELID_TO_TRAINID), protocol=13)


ACDC_CONDITIONS = ("fog", "night", "rain", "snow")
_ACDC_LAYOUT = (
    "ROOT/rgb_anon/<condition>/{train,val,test}/<sequence>/*_rgb_anon.png and "
    "ROOT/gt/<condition>/{train,val}/<sequence>/*_gt_labelIds.png, conditions fog, night, rain, snow"
)


def acdc_dataset(
    root: str | Path,
    *,
    split: str | None = None,
    with_labels: bool = True,
    transform: Callable[[dict], dict] | None = None,
    on_error: str = "raise",
) -> SegmentationDataset:
    """ACDC: ``rgb_anon/<cond>/<split>/<seq>/*_rgb_anon.png`` with ``gt/<cond>/<split>/<seq>/*_gt_labelIds.png``.

    ``split``: ``train`` (default), ``val`` or ``test`` over the four conditions (all four must be present),
    or ``<cond>/<split>`` (``night/val``), or ``<cond>`` (its train split). Labels are labelIds -> 19 trainIds
    (ACDC also ships ``*_gt_labelTrainIds.png``; we read the labelIds files). The test split has no public
    labels. Names: ``night/GOPR0355/GOPR0355_frame_000138_rgb_anon``.
    """
    _check_on_error(on_error)
    base = _root(root, "acdc", _ACDC_LAYOUT)
    parts = _split_parts(split) or ["train"]
    help_ = "split like val, night/val or night"
    phases = ("train", "val", "test")
    if len(parts) == 2:
        conds, phase = [_match_choice(parts[0], ACDC_CONDITIONS, "acdc condition", help_)], parts[1]
    elif len(parts) == 1 and parts[0].lower() in phases:
        conds, phase = list(ACDC_CONDITIONS), parts[0]
    elif len(parts) == 1:
        conds, phase = [_match_choice(parts[0], ACDC_CONDITIONS, "acdc condition or split", help_)], "train"
    else:
        raise DatasetError(f"acdc split {split!r}: expected {help_}")
    phase = _match_choice(phase, phases, "acdc split", help_)
    img_root = base / "rgb_anon"
    items: list[Item] = []
    for cond in conds:
        img_dir = _require_dir(img_root / cond / phase, f"the ACDC {cond} {phase} images", _ACDC_LAYOUT)
        images = _list_files(img_dir, suffixes=("_rgb_anon.png",), layout=_ACDC_LAYOUT)
        mask_for = None
        if with_labels:
            gt_dir = _require_dir(base / "gt" / cond / phase, f"the ACDC {cond} {phase} labels", _ACDC_LAYOUT)

            def mask_for(p: Path, d: Path = gt_dir, i: Path = img_dir) -> Path:
                return d / p.parent.relative_to(i) / f"{_strip_suffix(p.name, '_rgb_anon.png')}_gt_labelIds.png"

        items += _pair(images, mask_for=mask_for, name_for=lambda p, c=cond, i=img_dir: f"{c}/{_rel_name(p, i)}",
                       on_error=on_error, what=f"acdc {cond}/{phase} at {base}")
    split_name = f"{conds[0]}/{phase}" if len(conds) == 1 else phase
    return _make(items, kind="acdc", root=base, split=split_name, with_labels=with_labels, transform=transform,
                 on_error=on_error, mapper=LabelMapper.from_id_map(LABELID_TO_TRAINID), protocol=19)


_DARKZURICH_LAYOUT = (
    "ROOT/rgb_anon/{train,val,test}/{night,twilight,day}/<sequence>/*_rgb_anon.png and "
    "ROOT/gt/val/night/<sequence>/*_gt_labelIds.png"
)


def darkzurich_dataset(
    root: str | Path,
    *,
    split: str | None = None,
    with_labels: bool = True,
    transform: Callable[[dict], dict] | None = None,
    on_error: str = "raise",
) -> SegmentationDataset:
    """Dark Zurich: ``rgb_anon/<split>/<time>/<seq>/*_rgb_anon.png``, labels ``gt/val/night/<seq>/*_gt_labelIds.png``.

    ``split``: ``train`` (default, night images), ``val`` (night, labelled) or ``test``, optionally with the
    time of day: ``train/day``, ``train/twilight``. Only ``val`` has public labels: read the others with
    ``with_labels=False``. Names: ``night/GOPR0356/GOPR0356_frame_000321_rgb_anon``.
    """
    _check_on_error(on_error)
    base = _root(root, "darkzurich", _DARKZURICH_LAYOUT)
    parts = _split_parts(split) or ["train"]
    help_ = "split like val, train or train/day"
    if len(parts) > 2:
        raise DatasetError(f"darkzurich split {split!r}: expected {help_}")
    phase = _match_choice(parts[0], ("train", "val", "test"), "darkzurich split", help_)
    time = "night"
    if len(parts) == 2:
        time = _match_choice(parts[1], ("night", "twilight", "day"), "darkzurich time of day", help_)
    img_dir = _require_dir(base / "rgb_anon" / phase / time, f"the Dark Zurich {phase}/{time} images",
                           _DARKZURICH_LAYOUT)
    images = _list_files(img_dir, suffixes=("_rgb_anon.png",), layout=_DARKZURICH_LAYOUT)
    mask_for = None
    if with_labels:
        gt_dir = _require_dir(
            base / "gt" / phase / time,
            f"the Dark Zurich {phase}/{time} labels (only val/night is labelled; read other splits with "
            "with_labels=False)",
            _DARKZURICH_LAYOUT,
        )

        def mask_for(p: Path) -> Path:
            return gt_dir / p.parent.relative_to(img_dir) / f"{_strip_suffix(p.name, '_rgb_anon.png')}_gt_labelIds.png"

    names_base = img_dir.parent
    items = _pair(images, mask_for=mask_for, name_for=lambda p: _rel_name(p, names_base), on_error=on_error,
                  what=f"darkzurich {phase}/{time} at {base}")
    return _make(items, kind="darkzurich", root=base, split=f"{phase}/{time}", with_labels=with_labels,
                 transform=transform, on_error=on_error, mapper=LabelMapper.from_id_map(LABELID_TO_TRAINID),
                 protocol=19)


# ----------------------------------------------------------------------------------------------------------
# Folder dataset
# ----------------------------------------------------------------------------------------------------------

_FOLDER_LAYOUT = (
    "ROOT/images/<name>.{png,jpg,jpeg,bmp,webp}, optional ROOT/masks/<name>.png (class indices, or RGB colours "
    "with mask_format: color), ROOT/classes.yaml with 'names' (list), optional 'palette' (list of [R, G, B]), "
    "'ignore_index' (default 255), 'id_map' (raw value -> class index), 'mask_format' (index | color) and "
    "'ignore_color' ([R, G, B], colour masks)"
)
_CLASSES_KEYS = ("names", "palette", "ignore_index", "id_map", "mask_format", "ignore_color")
MASK_FORMATS = ("index", "color")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # YAML's true/false are ints in Python


@dataclass(frozen=True)
class FolderClasses:
    """A folder dataset's ``classes.yaml``: ``spec`` (``ignore_index=255``: masks from the dataset always use 255),
    ``ignore_value`` (the raw value meaning ignore in index masks), ``id_map`` (raw value -> class index, or None),
    ``mask_format`` (``"index"`` or ``"color"``: RGB masks in the ``palette`` colours), ``ignore_color`` (the RGB
    colour meaning ignore in colour masks, or None)."""

    spec: ClassSpec
    ignore_value: int = IGNORE_INDEX
    id_map: dict[int, int] | None = None
    mask_format: str = "index"
    ignore_color: tuple[int, int, int] | None = None


def load_folder_classes(path: str | Path) -> FolderClasses:
    """Read a folder dataset's ``classes.yaml`` (see :class:`FolderClasses`); errors name the file and the key."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise DatasetError(f"{path}: cannot read the class file ({e})") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a mapping with keys {list(_CLASSES_KEYS)}, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_CLASSES_KEYS))
    if unknown:
        raise DatasetError(f"{path}: unknown key(s) {unknown}; expected some of {list(_CLASSES_KEYS)}")
    names = data.get("names")
    if names is None:
        raise DatasetError(f"{path}: missing key 'names' (a list of class names)")
    if not isinstance(names, list) or not names or not all(_is_int(n) or isinstance(n, str) for n in names):
        raise DatasetError(f"{path}: key 'names': expected a non-empty list of strings, got {names!r}")
    if len(names) > 255:
        raise DatasetError(
            f"{path}: key 'names': at most 255 classes fit uint8 masks with 255 = ignore, got {len(names)}"
        )
    ignore = data.get("ignore_index", IGNORE_INDEX)
    if not _is_int(ignore) or not len(names) <= ignore < _LUT_SIZE:
        raise DatasetError(
            f"{path}: key 'ignore_index': expected an integer in [{len(names)}, {_LUT_SIZE - 1}] (outside the class "
            f"indices), got {ignore!r}"
        )
    palette = data.get("palette")
    if palette is not None:
        ok = isinstance(palette, list) and all(
            isinstance(c, (list, tuple)) and len(c) == 3
            and all(_is_int(v) and 0 <= v <= 255 for v in c)
            for c in palette
        )
        if not ok or len(palette) != len(names):
            raise DatasetError(
                f"{path}: key 'palette': expected {len(names)} colours [R, G, B] (integers 0..255), one per name, "
                f"got {palette!r}"
            )
    id_map = data.get("id_map")
    if id_map is not None:
        if not isinstance(id_map, dict) or not id_map:
            raise DatasetError(f"{path}: key 'id_map': expected a mapping raw value -> class index, got {id_map!r}")
        parsed: dict[int, int] = {}
        for k, v in id_map.items():
            try:
                raw = int(k)
            except (TypeError, ValueError):
                raw = -1
            valid_v = _is_int(v) and (0 <= v < len(names) or v == ignore)
            if not 0 <= raw < _LUT_SIZE or not valid_v:
                raise DatasetError(
                    f"{path}: key 'id_map': entry {k!r}: {v!r}: expected raw value 0..{_LUT_SIZE - 1} -> class index "
                    f"0..{len(names) - 1} (or the ignore value {ignore})"
                )
            parsed[raw] = IGNORE_INDEX if v == ignore else int(v)
        id_map = parsed
    mask_format = data.get("mask_format", "index")
    if mask_format not in MASK_FORMATS:
        raise DatasetError(f"{path}: key 'mask_format': expected one of {list(MASK_FORMATS)}, got {mask_format!r}")
    ignore_color = data.get("ignore_color")
    if ignore_color is not None and not (isinstance(ignore_color, list) and len(ignore_color) == 3
                                         and all(_is_int(v) and 0 <= v <= 255 for v in ignore_color)):
        raise DatasetError(f"{path}: key 'ignore_color': expected [R, G, B] (integers 0..255), got {ignore_color!r}")
    if mask_format == "color":
        if palette is None:
            raise DatasetError(f"{path}: mask_format: color needs key 'palette': the [R, G, B] colour of each class, "
                               "as the masks draw it")
        if id_map is not None:
            raise DatasetError(f"{path}: key 'id_map' maps raw index values; colour masks are mapped by 'palette'")
        if len({tuple(c) for c in palette}) != len(palette):
            raise DatasetError(f"{path}: key 'palette': mask_format: color needs one distinct colour per class")
    try:
        spec = ClassSpec(names=tuple(str(n) for n in names), palette=tuple(map(tuple, palette)) if palette else None)
    except ValueError as e:
        raise DatasetError(f"{path}: {e}") from e
    return FolderClasses(spec=spec, ignore_value=ignore, id_map=id_map, mask_format=mask_format,
                         ignore_color=tuple(ignore_color) if ignore_color is not None else None)


class ColorMapper:
    """RGB colour-coded masks -> class indices through the class ``palette``.

    Colours not in the palette become 255 (ignore); each file that has some gives one warning with their count
    (``ignore_color``, when set, is ignore without a warning).
    """

    has_invalid = False

    def __init__(self, palette: Sequence[Sequence[int]], *, ignore_color: Sequence[int] | None = None) -> None:
        codes = [_rgb_code(c) for c in palette]
        order = np.argsort(codes)
        self.codes = np.asarray(codes, dtype=np.int64)[order]
        self.classes = order.astype(np.uint8)
        self.ignore_code = _rgb_code(ignore_color) if ignore_color is not None else None

    def __call__(self, raw: torch.Tensor, path: Path) -> torch.Tensor:
        if raw.shape[0] < 3:
            raise DatasetError(f"{path}: mask_format: color expects RGB masks, got {raw.shape[0]} channel(s)")
        rgb = raw[:3].to(torch.int64).numpy()
        code = (rgb[0] << 16) | (rgb[1] << 8) | rgb[2]  # (H, W)
        idx = np.clip(np.searchsorted(self.codes, code), 0, len(self.codes) - 1)
        known = self.codes[idx] == code
        mask = np.where(known, self.classes[idx], IGNORE_INDEX).astype(np.uint8)
        unknown = ~known if self.ignore_code is None else ~known & (code != self.ignore_code)
        n = int(unknown.sum())
        if n:
            colours = np.unique(code[unknown])
            shown = ", ".join(str(tuple(int(v) for v in ((c >> 16) & 255, (c >> 8) & 255, c & 255)))
                              for c in colours[:5])
            warnings.warn(f"{path}: {n} pixel(s) of {len(colours)} colour(s) not in the palette ({shown}"
                          f"{' ...' if len(colours) > 5 else ''}) are ignored", DatasetWarning, stacklevel=2)
        return torch.from_numpy(mask)


def _rgb_code(c: Sequence[int]) -> int:
    return (int(c[0]) << 16) | (int(c[1]) << 8) | int(c[2])


def folder_dataset(
    root: str | Path,
    *,
    split: str | None = None,
    with_labels: bool = True,
    transform: Callable[[dict], dict] | None = None,
    on_error: str = "raise",
    classes: ClassSpec | None = None,
) -> SegmentationDataset:
    """Any folder: ``images/`` (png, jpg, jpeg, bmp, webp; sub-folders allowed), optional ``masks/`` with PNG
    masks paired by relative path and file stem, and ``classes.yaml``.

    ``classes.yaml`` keys: ``names`` (list, required), ``palette`` (list of ``[R, G, B]``), ``ignore_index``
    (raw value meaning ignore, default 255; the dataset's masks always carry 255), ``id_map`` (raw value ->
    class index; unmapped values become ignore). Without ``id_map`` a mask value outside ``0..C-1`` and the
    ignore value is an error naming the file and the values. ``mask_format: color`` reads RGB masks drawn in the
    ``palette`` colours (:class:`ColorMapper`: other colours become ignore, counted and warned; ``ignore_color``
    names the colour meaning ignore).

    With ``split``, the folder is ``ROOT/SPLIT``; its ``classes.yaml`` is looked up there, then in ``ROOT``.
    ``classes`` (a :class:`ClassSpec`) replaces the class file; an unlabelled folder (``with_labels=False``)
    needs neither, and then ``dataset.classes`` is ``None`` (the model's class spec applies).
    Files under ``masks/`` without an image are ignored. Names: ``street/0001`` for ``images/street/0001.jpg``.
    """
    _check_on_error(on_error)
    base = _root(Path(root).expanduser() / split if split else root, "folder", _FOLDER_LAYOUT)
    img_dir = _require_dir(base / "images", "the images folder", _FOLDER_LAYOUT)
    images = _list_files(img_dir, suffixes=IMAGE_EXTENSIONS, layout=_FOLDER_LAYOUT)

    candidates = [base / "classes.yaml"] + ([base.parent / "classes.yaml"] if split else [])
    class_file = next((p for p in candidates if p.is_file()), None)
    ignore_value, id_map, info = IGNORE_INDEX, None, None
    if class_file is not None and classes is None:
        info = load_folder_classes(class_file)
        classes, ignore_value, id_map = info.spec, info.ignore_value, info.id_map
    elif classes is not None:
        ignore_value = classes.ignore_index
        classes = ClassSpec(names=classes.names, palette=classes.palette)
    elif with_labels:
        raise DatasetError(
            f"{base / 'classes.yaml'} does not exist: a labelled folder dataset needs a class file. "
            f"Expected layout: {_FOLDER_LAYOUT}"
        )

    mask_for = mapper = None
    if with_labels:
        assert classes is not None
        mask_dir = _require_dir(base / "masks", "the masks folder (or build with with_labels=False)", _FOLDER_LAYOUT)
        mask_for = lambda p: mask_dir / p.relative_to(img_dir).with_suffix(".png")  # noqa: E731
        if info is not None and info.mask_format == "color":
            mapper = ColorMapper(classes.palette, ignore_color=info.ignore_color)
        else:
            mapper = (
                LabelMapper.from_id_map(id_map) if id_map is not None
                else LabelMapper.strict(classes.num_classes, ignore_value=ignore_value)
            )
    items = _pair(images, mask_for=mask_for, name_for=lambda p: _rel_name(p, img_dir), on_error=on_error,
                  what=f"folder dataset {base}")
    return _make(items, kind="folder", root=Path(root).expanduser(), split=split, with_labels=with_labels,
                 transform=transform, on_error=on_error, mapper=mapper, classes=classes, protocol=None)


# ----------------------------------------------------------------------------------------------------------
# Spec parsing, registry and builder
# ----------------------------------------------------------------------------------------------------------


def _synthetic_dataset(
    root: str,
    *,
    split: str | None = None,
    with_labels: bool = True,
    transform: Callable[[dict], dict] | None = None,
    on_error: str = "raise",
    **options: Any,
) -> Dataset:
    """The built-in benchmark: ``synthetic:DOMAIN[:SPLIT]`` with DOMAIN ``source|target|shift``."""
    from sfdaseg.data.synthetic import SyntheticDataset  # imported lazily: no import cost for real data

    _check_on_error(on_error)  # generated data cannot be unreadable; accepted for a uniform signature
    try:
        return SyntheticDataset(domain=str(root), split=split or "train", with_labels=with_labels,
                                transform=transform, **options)
    except TypeError as e:  # an option the generator does not take
        raise DatasetError(f"synthetic:{root}: {e}") from e
    except ValueError as e:  # unknown domain or split, bad option value: a DatasetError for the CLI
        raise e if isinstance(e, DatasetError) else DatasetError(f"synthetic:{root}: {e}") from e


DATASETS: dict[str, Callable[..., Dataset]] = {
    "gta5": gta5_dataset,
    "synthia": synthia_dataset,
    "cityscapes": cityscapes_dataset,
    "nthu": nthu_dataset,
    "acdc": acdc_dataset,
    "darkzurich": darkzurich_dataset,
    "folder": folder_dataset,
    "synthetic": _synthetic_dataset,
}

_SPEC_HELP = "expected KIND:ROOT[:SPLIT], e.g. gta5:/data/gta5, cityscapes:/data/cs:val or synthetic:target:val"


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed ``KIND:ROOT[:SPLIT]``; ``root`` stays a string (relative paths resolve against the cwd)."""

    kind: str
    root: str
    split: str | None = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.root}" + (f":{self.split}" if self.split else "")


def _unknown_kind(kind: str) -> DatasetError:
    close = difflib.get_close_matches(kind, list(DATASETS), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return DatasetError(f"unknown dataset kind {kind!r}, expected one of {sorted(DATASETS)}{hint}")


def parse_dataset_spec(spec: str) -> DatasetSpec:
    """Parse ``KIND:ROOT[:SPLIT]``. The kind is case-insensitive; a Windows drive (``C:\\``) stays in the root."""
    if not isinstance(spec, str) or ":" not in spec:
        raise DatasetError(f"dataset {spec!r}: {_SPEC_HELP}")
    kind, rest = spec.split(":", 1)
    kind = kind.strip().lower()
    if not kind:
        raise DatasetError(f"dataset {spec!r}: missing KIND; {_SPEC_HELP}")
    if kind not in DATASETS:
        raise _unknown_kind(kind)
    root, split = rest, None
    # The split is what follows the last ':' unless that ':' belongs to a drive letter ("C:\data").
    if ":" in rest:
        head, tail = rest.rsplit(":", 1)
        if not (re.fullmatch(r"[A-Za-z]", head) and tail[:1] in ("\\", "/")):
            root, split = head, tail
            if not split:
                raise DatasetError(f"dataset {spec!r}: empty SPLIT after the last ':'; {_SPEC_HELP}")
    if not root:
        raise DatasetError(f"dataset {spec!r}: empty ROOT; {_SPEC_HELP}")
    return DatasetSpec(kind=kind, root=root, split=split)


def build_dataset(
    spec: str,
    *,
    with_labels: bool = True,
    transform: Callable[[dict], dict] | None = None,
    on_error: str = "raise",
    options: dict | None = None,
) -> Dataset:
    """Build the dataset named ``spec`` (``KIND:ROOT[:SPLIT]``) through the :data:`DATASETS` registry.

    ``options`` are extra keyword arguments of the reader (e.g. ``classes`` for ``folder``, generator
    settings for ``synthetic``); an option the reader does not take is an error listing the accepted ones.
    """
    _check_on_error(on_error)
    parsed = parse_dataset_spec(spec)
    reader = DATASETS[parsed.kind]
    options = dict(options or {})
    params = inspect.signature(reader).parameters
    if options and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        fixed = {"root", "split", "with_labels", "transform", "on_error"}
        accepted = [n for n in params if n not in fixed]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise DatasetError(
                f"dataset {spec!r}: unknown option(s) {unknown}; {parsed.kind} accepts {accepted or 'none'}"
            )
    return reader(parsed.root, split=parsed.split, with_labels=with_labels, transform=transform, on_error=on_error,
                  **options)
