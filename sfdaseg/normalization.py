"""Input normalisation of a model: ``(x * 255 - mean) / std``, the presets, and their plain-data form.

A model carries its own normalisation (applied inside ``SegmentationModel.extract``) and a checkpoint stores it
as plain data, so a checkpoint never meets the wrong one. A leaf module: the checkpoint format
(:mod:`sfdaseg.storage`) and the models both use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

__all__ = ["CAFFE", "IMAGENET", "NORMALIZATIONS", "Normalization"]


@dataclass(frozen=True)
class Normalization:
    """Per-channel input normalisation ``(x * 255 - mean) / std``.

    Attributes:
        mean: per-channel mean in 0..255 units, in the model's channel order (BGR when ``bgr``).
        std: per-channel standard deviation in 0..255 units, same order.
        bgr: the model expects BGR input (Caffe-trained weights); the RGB input is flipped first.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    bgr: bool = False

    def __post_init__(self) -> None:
        mean = tuple(float(v) for v in self.mean)
        std = tuple(float(v) for v in self.std)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"Normalization: expected 3 mean and 3 std values, got mean={mean}, std={std}")
        if any(s <= 0 for s in std):
            raise ValueError(f"Normalization.std: expected positive values, got {std}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "bgr", bool(self.bgr))

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std), "bgr": self.bgr}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Normalization":
        try:
            return cls(mean=tuple(d["mean"]), std=tuple(d["std"]), bgr=bool(d.get("bgr", False)))
        except KeyError as e:
            raise ValueError(f"Normalization: missing key {e.args[0]!r} in {dict(d)}") from None

    @classmethod
    def resolve(cls, value: "str | Mapping | Normalization") -> "Normalization":
        """A preset name (``"imagenet"``, ``"caffe"``), a ``to_dict()`` mapping, or a Normalization."""
        if isinstance(value, Normalization):
            return value
        if isinstance(value, str):
            try:
                return NORMALIZATIONS[value.lower()]
            except KeyError:
                raise ValueError(
                    f"normalization: unknown preset {value!r}; choices: {sorted(NORMALIZATIONS)} "
                    "or a mapping with 'mean', 'std' (0..255 units) and 'bgr'"
                ) from None
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        raise TypeError(f"normalization: expected a preset name, a mapping or a Normalization, got {type(value)}")

    def to_plain(self) -> str | dict:
        """The preset name when this is a preset (short, readable build args), else ``to_dict()``."""
        for key, preset in NORMALIZATIONS.items():
            if preset == self:
                return key
        return self.to_dict()


# torchvision / timm / Hugging Face ImageNet statistics (RGB).
IMAGENET = Normalization(mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375), bgr=False)
# The original Caffe DeepLab / ResNet-101 weights: BGR, mean subtraction only.
CAFFE = Normalization(mean=(104.008, 116.669, 122.679), std=(1.0, 1.0, 1.0), bgr=True)
NORMALIZATIONS: dict[str, Normalization] = {"imagenet": IMAGENET, "caffe": CAFFE}
