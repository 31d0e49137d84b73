"""Class sets, palettes, evaluation protocols and raw-id -> class-index tables.

Everything here is plain data plus two small helpers; no I/O. The 19 Cityscapes trainIds are the shared class
space of every driving dataset: GTA5, Cityscapes, ACDC and Dark Zurich map their raw ``labelIds`` into it, and
SYNTHIA maps its own ids into it (it has no terrain, truck or train).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

IGNORE_INDEX = 255

Color = tuple[int, int, int]


@dataclass(frozen=True)
class ClassSpec:
    """The class space of a dataset or a model.

    Attributes:
        names: one name per class index ``0..C-1``.
        palette: one RGB colour per class (for colour masks); ``None`` picks a deterministic palette.
        ignore_index: label value that is excluded from losses and metrics.
    """

    names: tuple[str, ...]
    palette: tuple[Color, ...] | None = None
    ignore_index: int = IGNORE_INDEX
    _palette: tuple[Color, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = tuple(str(n) for n in self.names)
        object.__setattr__(self, "names", names)
        if not names:
            raise ValueError("ClassSpec.names: expected at least one class name, got an empty list")
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"ClassSpec.names: class names must be unique, repeated: {dup}")
        if not 0 <= self.ignore_index <= 255 or self.ignore_index < len(names):
            raise ValueError(
                f"ClassSpec.ignore_index: expected an integer in [{len(names)}, 255] "
                f"(outside the {len(names)} class indices), got {self.ignore_index}"
            )
        if self.palette is not None:
            palette = tuple(tuple(int(v) for v in c) for c in self.palette)
            if len(palette) != len(names):
                raise ValueError(
                    f"ClassSpec.palette: expected {len(names)} colours (one per class), got {len(palette)}"
                )
            for i, c in enumerate(palette):
                if len(c) != 3 or not all(0 <= v <= 255 for v in c):
                    raise ValueError(f"ClassSpec.palette[{i}]: expected [R, G, B] with values in 0..255, got {list(c)}")
            object.__setattr__(self, "palette", palette)
        object.__setattr__(self, "_palette", self.palette or default_palette(len(names)))

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def colors(self) -> tuple[Color, ...]:
        """The palette, or a deterministic one when none was given."""
        return self._palette

    def to_dict(self) -> dict:
        return {
            "names": list(self.names),
            "palette": [list(c) for c in self.palette] if self.palette is not None else None,
            "ignore_index": self.ignore_index,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "ClassSpec":
        palette = d.get("palette")
        return cls(
            names=tuple(d["names"]),
            palette=tuple(tuple(c) for c in palette) if palette is not None else None,
            ignore_index=int(d.get("ignore_index", IGNORE_INDEX)),
        )


def default_palette(n: int) -> tuple[Color, ...]:
    """A deterministic, well-spread palette (the bit-interleaving scheme used by PASCAL VOC)."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return tuple(out)


CITYSCAPES_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
# The official Cityscapes colours of the 19 trainIds (cityscapesscripts.helpers.labels).
CITYSCAPES_PALETTE: tuple[Color, ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
CITYSCAPES19 = ClassSpec(names=CITYSCAPES_NAMES, palette=CITYSCAPES_PALETTE)

# Evaluation protocols: which of the 19 trainIds enter the mean. 16 = SYNTHIA (no terrain, truck, train);
# 13 = SYNTHIA mIoU* and NTHU cross-city (the 16 without wall, fence, pole).
PROTOCOLS: dict[int, tuple[int, ...]] = {
    19: tuple(range(19)),
    16: (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18),
    13: (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18),
}

# Cityscapes labelIds (also GTA5, ACDC, Dark Zurich) -> trainId. Every other id maps to IGNORE_INDEX.
LABELID_TO_TRAINID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
    27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
TRAINID_TO_LABELID: dict[int, int] = {v: k for k, v in LABELID_TO_TRAINID.items()}

# SYNTHIA-RAND-CITYSCAPES class ids -> Cityscapes trainId (no terrain 9, truck 14, train 16).
SYNTHIA_TO_TRAINID: dict[int, int] = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 10, 10: 11, 17: 12, 8: 13, 19: 15, 12: 17,
    11: 18,
}


def make_lut(id_map: Mapping[int, int], *, size: int = 256, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """A lookup table ``lut`` with ``lut[raw] = class`` for every raw value in ``0..size-1``.

    Raw values missing from ``id_map`` map to ``ignore_index``. Use ``size=65536`` for 16-bit label images.
    """
    dtype = np.uint8 if max([ignore_index, *id_map.values()], default=0) < 256 else np.int64
    lut = np.full(size, ignore_index, dtype=dtype)
    for raw, cls in id_map.items():
        if not 0 <= int(raw) < size:
            raise ValueError(f"id_map: raw value {raw} is outside 0..{size - 1}")
        lut[int(raw)] = int(cls)
    return lut


def colorize(mask: np.ndarray, colors: Sequence[Color], *, ignore_color: Color = (0, 0, 0)) -> np.ndarray:
    """Map a class-index mask ``(H, W)`` to an RGB image ``(H, W, 3)`` uint8; unknown values get ``ignore_color``."""
    table = np.tile(np.asarray(ignore_color, dtype=np.uint8), (256, 1))
    table[: len(colors)] = np.asarray(colors, dtype=np.uint8)
    return table[np.asarray(mask, dtype=np.uint8)]
