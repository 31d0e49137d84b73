"""The built-in benchmark: procedural street scenes in Cityscapes trainIds, in three domains.

``SyntheticDataset(domain, split)`` generates each sample on the fly from an RNG seeded by
``(seed, domain, split, index)``: the same index always gives the same scene (in every DataLoader worker),
different seeds give different scenes, and the train, val and test splits never share a scene. Default lengths:
train 1000, val 200, test 200. Scenes are rendered with vectorised numpy, cheap enough for DataLoader workers to keep up
with any model trained on them.

Scene geometry is a pinhole camera over a flat street: a road with lane markings between two sidewalks (with
kerbs), optional grass verges (terrain), rows of building facades with windows and shop fronts (or masses of
trees) along both sides and across the far end, fences, walls and hedges along the sidewalk edge, and sprites
standing on the ground plane: cars (boot, cabin, windows, wheels, rear lights; the side is drawn in
perspective when the car is off-axis), persons (legs, torso, arms, head), poles with traffic signs or traffic
lights, and trees (trunk and crown). Everything is projected with one focal length and horizon, sprites are
drawn far to near, and each pixel's label is the class of the surface drawn there, so labels are exact (no
255 is produced). Classes (trainIds): road 0, sidewalk 1, building 2, wall 3, fence 4, pole 5, traffic light
6, traffic sign 7, vegetation 8, terrain 9, sky 10, person 11, car 13. Windows, lane markings, kerbs, wheels,
lamps and tree trunks belong to their object's class, as in Cityscapes.

The domains, and the real gap each one imitates:

- ``source`` (a game engine, like GTA5 / SYNTHIA): flat-shaded surfaces, one clean saturated colour per
  surface (purple-grey road, pink sidewalk, brick/tan facades, blue sky, bright-green trees, bright cars and
  clothes) with mild per-object variation; no texture, no noise, no blur, aliased sharp edges. Its own
  geometry and statistics: a long lens (large objects), a high camera, wide roads, tall buildings with regular
  windows, boxy cars, blocky persons, round lollipop trees, rectangular/round signs; few persons and cars, many
  fences and walls, little terrain.
- ``target`` (a real camera, like Cityscapes): textured surfaces (asphalt grain, sidewalk tiles, facade
  bricks, foliage, grass, clouds), cast shadows over one side of the street, a colour cast, exposure and gamma
  changes, a lens blur and sensor noise. Colours keep their hues but are less saturated and spread more per
  object, so the classes overlap (grey/black/white cars among coloured ones, darker clothes, paler sky,
  olive trees). Different geometry and statistics: a wide lens (everything smaller), a low camera and
  horizon, narrower roads, lower buildings, rounded cars (and vans), slim persons with separate legs and
  arms, lobed trees, triangular/diamond signs, traffic lights hung on arms; more persons (some crossing the
  road), cars, vegetation and terrain, zebra crossings. Layout and relative contrasts stay the same, so a
  source model's predictions on target images are partially right: what self-training builds on.
- ``shift`` (the target in fog at dusk, like Foggy Cityscapes / ACDC fog): the target's scene distribution
  and textures, then depth-dependent haze toward a grey airlight, darker exposure and more sensor noise.
  Held out: never used for adaptation or model selection; it shows whether an adapted model overfits to the
  target domain.

How large the gap is, and which parts of the domain shift make it, is measured in
``benchmarks/results/synthetic_gap.md``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from sfdaseg.data.classes import CITYSCAPES19, ClassSpec

__all__ = [
    "DOMAINS",
    "SPLITS",
    "DEFAULT_LENGTHS",
    "SyntheticDataset",
    "generate_scene",
    "write_folder_dataset",
]

DOMAINS: tuple[str, ...] = ("source", "target", "shift")
# Split codes enter the RNG seed, so train and val can never draw the same scene.
# ``test`` is the held-out split every reported number is measured on; ``val`` is for choosing settings.
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
DEFAULT_LENGTHS: dict[str, int] = {"train": 1000, "val": 200, "test": 200}
DEFAULT_SIZE: tuple[int, int] = (128, 256)
# The shift domain reuses the target's scene generator and textures, then adds fog; its own domain code keeps
# its scenes distinct from the target's.
_DOMAIN_CODES = {"source": 101, "target": 202, "shift": 303}

# trainIds
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON, CAR = (
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13,
)

# Materials: what a surface looks like (its colour family and texture), finer than its class.
(M_SKY, M_ASPHALT, M_MARKING, M_PAVING, M_KERB, M_GRASS, M_FACADE, M_WINDOW, M_CONCRETE, M_FENCE, M_POLE,
 M_SIGN, M_LIGHTBOX, M_LAMP, M_FOLIAGE, M_BARK, M_CARPAINT, M_CARGLASS, M_RUBBER, M_SKIN, M_CLOTH, M_HAIR
) = range(22)
N_MATERIALS = 22

_SKY_DEPTH = 1000.0  # metres; "infinitely far" for the fog of the shift domain

Rng = np.random.Generator
Range = tuple[float, float]
Palette = dict[str, tuple[tuple[float, float, float], ...]]


# --------------------------------------------------------------------------------------------------------------
# Domain descriptions


@dataclass(frozen=True)
class _Layout:
    """Scene geometry and content of a domain (ranges are sampled uniformly per scene; lengths in metres)."""

    focal: Range  # focal length as a fraction of the image width
    horizon: Range  # horizon row as a fraction of the image height
    cam_height: Range
    road_half: Range  # half-width of the road
    sidewalk: Range
    terrain_prob: float  # probability that a side has a grass verge between sidewalk and facades
    terrain_width: Range
    building_height: Range
    building_length: Range
    trees_block_prob: float  # a facade block that is a mass of trees instead of a building
    floor_height: Range
    window_spacing: Range
    window_fill: Range  # window width as a fraction of its spacing
    edge_probs: tuple[float, float, float]  # per side: fence, wall, hedge along the sidewalk edge
    n_cars: tuple[int, int]  # inclusive
    n_persons: tuple[int, int]
    n_poles: tuple[int, int]
    n_trees: tuple[int, int]
    persons_on_road: float  # fraction of persons crossing the road
    light_prob: float  # a pole carries a traffic light (else a sign, or nothing)
    sign_shapes: tuple[str, ...]
    sign_size: Range  # half-size of a sign
    fence_slat: float  # width of the fence bars
    fence_gap: Range  # gap between the fence bars
    dash_period: float  # of the dashed centre line (a third of it is painted)
    car_shape: str  # "boxy" | "round"
    car_scale: Range
    person_height: Range
    person_width: Range  # shoulder width
    person_shape: str  # "block" | "limbs"
    tree_shape: str  # "round" | "irregular"
    pole_width: float
    light_on_arm: float  # probability that a traffic light hangs on an arm over the road
    zebra_prob: float
    z_end: Range  # the street ends in a cross facade at this depth


@dataclass(frozen=True)
class _Look:
    """Colours and the camera model of a domain."""

    palette: Palette  # material name -> colour choices (RGB in [0, 1])
    jitter: float  # per-object colour jitter (std, per channel)
    side_shade: tuple[float, float]  # brightness of left / right facades (light direction)
    textured: bool  # the real-camera pipeline: textures, cast shadows, colour cast, exposure, gamma
    texture: float  # strength of the noise textures (scales ``_TEX_AMP``)
    shadow_prob: float  # the left side of the street lies in shadow
    cast: tuple[float, float, float]  # colour cast (RGB gain), randomised per scene
    cast_jitter: float
    gamma: Range
    gain: Range
    blur: int  # passes of a [1, 2, 1] / 4 separable blur
    noise: Range  # sensor noise std in [0, 1] units
    fog: Range | None  # extinction coefficient (1/m) of the haze; None for no fog
    fog_dark: Range  # global darkening of fogged scenes (dusk)


_SOURCE_LAYOUT = _Layout(
    focal=(0.95, 1.1), horizon=(0.42, 0.5), cam_height=(1.7, 2.0), road_half=(4.5, 6.5), sidewalk=(2.5, 4.0),
    terrain_prob=0.15, terrain_width=(1.0, 2.5), building_height=(9.0, 24.0), building_length=(10.0, 22.0),
    trees_block_prob=0.12, floor_height=(3.2, 3.8), window_spacing=(2.8, 3.6), window_fill=(0.45, 0.6),
    edge_probs=(0.45, 0.35, 0.15), n_cars=(1, 4), n_persons=(0, 3), n_poles=(1, 4), n_trees=(0, 3),
    persons_on_road=0.0, light_prob=0.3, sign_shapes=("rect", "circle"), sign_size=(0.3, 0.38),
    fence_slat=0.12, fence_gap=(0.06, 0.1), dash_period=9.0, car_shape="boxy", car_scale=(1.0, 1.12),
    person_height=(1.75, 1.95), person_width=(0.5, 0.6), person_shape="block", tree_shape="round",
    pole_width=0.16, light_on_arm=0.0, zebra_prob=0.0, z_end=(70.0, 110.0),
)
_TARGET_LAYOUT = _Layout(
    focal=(0.68, 0.8), horizon=(0.36, 0.44), cam_height=(1.25, 1.5), road_half=(3.2, 5.0), sidewalk=(1.8, 3.0),
    terrain_prob=0.55, terrain_width=(1.0, 3.0), building_height=(6.0, 16.0), building_length=(6.0, 14.0),
    trees_block_prob=0.3, floor_height=(2.8, 3.3), window_spacing=(1.8, 2.6), window_fill=(0.55, 0.75),
    edge_probs=(0.25, 0.15, 0.45), n_cars=(2, 7), n_persons=(2, 9), n_poles=(2, 5), n_trees=(1, 5),
    persons_on_road=0.25, light_prob=0.55, sign_shapes=("triangle", "diamond", "rect"), sign_size=(0.26, 0.34),
    fence_slat=0.07, fence_gap=(0.1, 0.16), dash_period=6.0, car_shape="round",
    car_scale=(0.9, 1.0), person_height=(1.55, 1.85), person_width=(0.36, 0.44), person_shape="limbs",
    tree_shape="irregular", pole_width=0.12, light_on_arm=0.5, zebra_prob=0.35, z_end=(50.0, 90.0),
)

_SOURCE_PALETTE: Palette = {
    "sky": ((0.30, 0.55, 0.95), (0.40, 0.65, 1.0)),
    "asphalt": ((0.38, 0.30, 0.42),),
    "marking": ((0.95, 0.95, 0.92),),
    "paving": ((0.80, 0.60, 0.72),),
    "kerb": ((0.85, 0.80, 0.82),),
    "grass": ((0.45, 0.80, 0.30),),
    "facade": ((0.78, 0.45, 0.32), (0.88, 0.78, 0.55), (0.70, 0.62, 0.50)),
    "window": ((0.35, 0.55, 0.80),),
    "shopglass": ((0.10, 0.12, 0.18), (0.16, 0.14, 0.12)),
    "concrete": ((0.60, 0.62, 0.72),),
    "fence": ((0.62, 0.45, 0.25),),
    "pole": ((0.55, 0.58, 0.62),),
    "sign": ((0.95, 0.15, 0.10), (0.10, 0.35, 0.90), (1.0, 0.85, 0.10)),
    "lightbox": ((0.15, 0.18, 0.10),),
    "lamp": ((1.0, 0.2, 0.1), (1.0, 0.8, 0.1), (0.2, 1.0, 0.3)),
    "foliage": ((0.20, 0.65, 0.15), (0.30, 0.72, 0.20)),
    "bark": ((0.50, 0.32, 0.18),),
    "carpaint": ((0.90, 0.12, 0.10), (0.10, 0.25, 0.90), (0.95, 0.85, 0.10), (0.95, 0.95, 0.95), (0.15, 0.70, 0.25),
                 (0.12, 0.12, 0.14)),
    "carglass": ((0.15, 0.22, 0.35),),
    "rubber": ((0.08, 0.08, 0.08),),
    "taillight": ((0.90, 0.10, 0.05),),
    "skin": ((0.90, 0.70, 0.55), (0.60, 0.42, 0.30)),
    "cloth": ((0.95, 0.30, 0.10), (0.15, 0.45, 0.95), (0.95, 0.80, 0.15), (0.60, 0.15, 0.75), (0.15, 0.75, 0.65)),
    "pants": ((0.15, 0.20, 0.55), (0.30, 0.25, 0.20)),
    "hair": ((0.25, 0.15, 0.08), (0.85, 0.70, 0.30)),
}
# Real-camera colours: the same hues, desaturated, darker and spread, so that they overlap across classes
# (greyer road and sidewalk, paler sky, darker foliage, grey/black/white cars among coloured ones, darker clothes).
_TARGET_PALETTE: Palette = {
    "sky": ((0.36, 0.58, 0.92), (0.46, 0.64, 0.90), (0.56, 0.68, 0.86)),
    "asphalt": ((0.39, 0.32, 0.42), (0.43, 0.38, 0.43)),
    "marking": ((0.88, 0.88, 0.84),),
    "paving": ((0.78, 0.60, 0.70), (0.70, 0.60, 0.65)),
    "kerb": ((0.76, 0.74, 0.74),),
    "grass": ((0.44, 0.64, 0.27), (0.50, 0.62, 0.30)),
    "facade": ((0.70, 0.50, 0.42), (0.78, 0.70, 0.54), (0.64, 0.57, 0.48), (0.72, 0.66, 0.60)),
    "window": ((0.30, 0.42, 0.56), (0.34, 0.46, 0.60)),
    "shopglass": ((0.09, 0.10, 0.12), (0.14, 0.13, 0.12)),
    "concrete": ((0.58, 0.58, 0.62),),
    "fence": ((0.54, 0.45, 0.32), (0.50, 0.46, 0.36)),
    "pole": ((0.48, 0.50, 0.53),),
    "sign": ((0.88, 0.20, 0.16), (0.16, 0.35, 0.80), (0.95, 0.85, 0.35)),
    "lightbox": ((0.14, 0.15, 0.12),),
    "lamp": ((0.95, 0.25, 0.15), (0.95, 0.75, 0.15), (0.25, 0.95, 0.40)),
    "foliage": ((0.22, 0.50, 0.16), (0.30, 0.55, 0.20)),
    "bark": ((0.40, 0.30, 0.20),),
    "carpaint": ((0.66, 0.16, 0.14), (0.30, 0.40, 0.80), (0.78, 0.72, 0.28), (0.92, 0.92, 0.90), (0.30, 0.50, 0.22),
                 (0.55, 0.55, 0.58), (0.18, 0.18, 0.20)),
    "carglass": ((0.14, 0.18, 0.26),),
    "rubber": ((0.07, 0.07, 0.07),),
    "taillight": ((0.80, 0.15, 0.10),),
    "skin": ((0.88, 0.68, 0.54), (0.58, 0.40, 0.29)),
    "cloth": ((0.90, 0.30, 0.12), (0.18, 0.42, 0.88), (0.90, 0.76, 0.18), (0.55, 0.18, 0.68), (0.18, 0.68, 0.62),
              (0.25, 0.25, 0.28)),
    "pants": ((0.15, 0.20, 0.52), (0.28, 0.24, 0.20)),
    "hair": ((0.22, 0.14, 0.08), (0.78, 0.64, 0.28)),
}

_SOURCE_LOOK = _Look(
    palette=_SOURCE_PALETTE, jitter=0.025, side_shade=(1.0, 0.85), textured=False, texture=0.0, shadow_prob=0.0,
    cast=(1.0, 1.0, 1.0), cast_jitter=0.0, gamma=(1.0, 1.0), gain=(1.0, 1.0), blur=0, noise=(0.0, 0.0),
    fog=None, fog_dark=(1.0, 1.0),
)
_TARGET_LOOK = _Look(
    palette=_TARGET_PALETTE, jitter=0.045, side_shade=(0.75, 1.0), textured=True, texture=0.7, shadow_prob=0.35,
    cast=(1.03, 1.0, 0.95), cast_jitter=0.03, gamma=(0.9, 1.1), gain=(0.9, 1.05), blur=1, noise=(0.02, 0.04),
    fog=None, fog_dark=(1.0, 1.0),
)
_SHIFT_LOOK = _Look(
    palette=_TARGET_PALETTE, jitter=0.045, side_shade=(0.75, 1.0), textured=True, texture=0.7, shadow_prob=0.2,
    cast=(1.0, 1.0, 1.02), cast_jitter=0.03, gamma=(0.9, 1.1), gain=(0.85, 1.0), blur=1, noise=(0.03, 0.05),
    fog=(0.012, 0.03), fog_dark=(0.6, 0.85),
)

_DOMAINS: dict[str, tuple[_Layout, _Look]] = {
    "source": (_SOURCE_LAYOUT, _SOURCE_LOOK),
    "target": (_TARGET_LAYOUT, _TARGET_LOOK),
    "shift": (_TARGET_LAYOUT, _SHIFT_LOOK),
}

# Texture amplitudes per material for textured looks: (pixel grain, mid-frequency, low-frequency blotches).
_TEX_AMP = np.zeros((N_MATERIALS, 3), dtype=np.float32)
for _m, _amp in {
    M_SKY: (0.0, 0.0, 0.0), M_ASPHALT: (0.10, 0.08, 0.08), M_MARKING: (0.08, 0.15, 0.1), M_PAVING: (0.06, 0.06, 0.08),
    M_KERB: (0.05, 0.05, 0.05), M_GRASS: (0.18, 0.18, 0.12), M_FACADE: (0.04, 0.05, 0.10), M_WINDOW: (0.05, 0.25, 0.1),
    M_CONCRETE: (0.07, 0.10, 0.10), M_FENCE: (0.08, 0.1, 0.05), M_POLE: (0.04, 0.05, 0.0), M_SIGN: (0.04, 0.05, 0.0),
    M_LIGHTBOX: (0.04, 0.0, 0.0), M_LAMP: (0.0, 0.0, 0.0), M_FOLIAGE: (0.20, 0.30, 0.12), M_BARK: (0.15, 0.1, 0.0),
    M_CARPAINT: (0.03, 0.08, 0.06), M_CARGLASS: (0.04, 0.2, 0.1), M_RUBBER: (0.03, 0.0, 0.0), M_SKIN: (0.04, 0.0, 0.0),
    M_CLOTH: (0.08, 0.1, 0.0), M_HAIR: (0.08, 0.0, 0.0),
}.items():
    _TEX_AMP[_m] = _amp


# --------------------------------------------------------------------------------------------------------------
# Scene construction


class _Stream:
    """Buffered scalar draws from a ``Generator``.

    Sampling a scene takes a few hundred scalar draws; one ``Generator`` call costs about a microsecond, a list
    lookup a tenth of that. The buffer is refilled from the same generator, so scenes stay deterministic.
    """

    def __init__(self, rng: Rng, n: int = 256) -> None:
        self.rng, self.n = rng, n
        self._u: list[float] = []
        self._g: list[float] = []

    def uniform(self, lo: float = 0.0, hi: float = 1.0) -> float:
        if not self._u:
            self._u = self.rng.random(self.n).tolist()
        return lo + (hi - lo) * self._u.pop()

    def normal(self, mean: float = 0.0, std: float = 1.0) -> float:
        if not self._g:
            self._g = self.rng.standard_normal(self.n).tolist()
        return mean + std * self._g.pop()

    def integers(self, lo: int, hi: int | None = None) -> int:
        """An integer in ``[lo, hi)`` (or ``[0, lo)``)."""
        if hi is None:
            lo, hi = 0, lo
        return min(lo + int(self.uniform() * (hi - lo)), hi - 1)


class _Canvas:
    """A part-id map plus a table of parts (class, material, colour, depth, shade).

    Painting writes one int16 per pixel; labels, colours, materials and depths are looked up from the part table
    once at the end, which keeps the per-sprite cost to one masked assignment.
    """

    def __init__(self, h: int, w: int) -> None:
        self.h, self.w = h, w
        self.pid = np.zeros((h, w), dtype=np.int16)
        self.depth = np.full((h, w), _SKY_DEPTH, dtype=np.float32)  # of background surfaces; sprites use the table
        self.u = np.zeros((h, w), dtype=np.float32)  # surface coordinates (metres) for world-aligned textures
        self.v = np.zeros((h, w), dtype=np.float32)
        self.cls: list[int] = []
        self.mat: list[int] = []
        self.col: list[int] = []  # index into the scene's colour list
        self.pdepth: list[float] = []
        self.shade: list[float] = []

    def part(self, cls: int, mat: int, colour: int, depth: float = -1.0, shade: float = 1.0) -> int:
        """Register a surface; ``colour`` indexes ``_Scene.colours``, ``depth`` < 0 means "from the depth map"."""
        self.cls.append(cls)
        self.mat.append(mat)
        self.col.append(colour)
        self.pdepth.append(depth)
        self.shade.append(shade)
        return len(self.cls) - 1

    def paint(self, box: tuple[int, int, int, int], mask: np.ndarray, pid: int) -> None:
        y0, y1, x0, x1 = box
        self.pid[y0:y1, x0:x1][mask] = pid


class _Scene:
    """Per-scene camera and street parameters (pixels and metres)."""

    def __init__(self, rng: Rng, lay: _Layout, look: _Look, h: int, w: int) -> None:
        self.rng, self.lay, self.look, self.h, self.w = rng, lay, look, h, w
        self.r = _Stream(rng)
        u = self.r.uniform
        self.f = u(*lay.focal) * w
        self.yh = u(*lay.horizon) * h
        self.vx = w * (0.5 + u(-0.06, 0.06))
        self.cam = u(*lay.cam_height)
        half = u(*lay.road_half)
        shift = u(-0.3, 0.3) * half  # the camera is not always in the middle of the road
        self.road = (-half - shift, half - shift)
        self.sidewalk = (u(*lay.sidewalk), u(*lay.sidewalk))
        self.terrain = tuple(u(*lay.terrain_width) if u() < lay.terrain_prob else 0.0 for _ in range(2))
        # Lateral distance of the sidewalk's outer edge and of the facades, left (negative X) and right.
        self.edge = (self.road[0] - self.sidewalk[0], self.road[1] + self.sidewalk[1])
        self.facade = (self.edge[0] - self.terrain[0], self.edge[1] + self.terrain[1])
        self.z_end = u(*lay.z_end)
        self.shadow = look.shadow_prob > 0 and u() < look.shadow_prob
        self.ground_shadow: np.ndarray | None = None  # (h, w) bool, set with the background
        self.shadow_edge: tuple[float, np.ndarray, np.ndarray] | None = None
        self.colours: list[tuple[float, float, float]] = []
        self.canvas = _Canvas(h, w)

    def colour(self, key: str) -> int:
        """Pick a colour of material ``key``; returns its index in ``colours``.

        Parts that share an index share the colour (a car's rear and side); the per-object jitter is drawn for
        all colours at once when rendering.
        """
        choices = self.look.palette[key]
        self.colours.append(choices[self.r.integers(len(choices))])
        return len(self.colours) - 1

    def sprite(
        self, x: float, z: float, half_w: float, top: float, bottom: float = 0.0
    ) -> tuple[tuple[int, int, int, int], np.ndarray, np.ndarray, float] | None:
        """Pixel box and local metric coordinates of a billboard at lateral ``x``, depth ``z``.

        Returns ``(box, dx (1, w), y (h, 1), s)`` where ``dx`` is the lateral offset and ``y`` the height above
        the ground of each pixel centre, in metres, and ``s`` pixels per metre; ``None`` when off-screen.
        """
        s = self.f / z
        xc = self.vx + s * x
        yg = self.yh + s * self.cam
        x0, x1 = max(int(math.floor(xc - half_w * s)), 0), min(int(math.ceil(xc + half_w * s)) + 1, self.w)
        y0, y1 = max(int(math.floor(yg - top * s)), 0), min(int(math.ceil(yg - bottom * s)) + 1, self.h)
        if x1 <= x0 or y1 <= y0:
            return None
        dx = ((np.arange(x0, x1, dtype=np.float32) + 0.5 - xc) / s)[None, :]
        y = ((yg - np.arange(y0, y1, dtype=np.float32) - 0.5) / s)[:, None]
        return (y0, y1, x0, x1), dx, y, s


def _frac(a: np.ndarray, period: float | np.ndarray) -> np.ndarray:
    """``(a mod period) / period`` in ``[0, 1)``; a float ``%`` costs ten times more in numpy."""
    q = a / period
    return q - np.floor(q)


def _noise1d(rng: Rng, lo: float, hi: float, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Knots of a 1-D random profile (for ``np.interp``): positions every ``step`` and values in N(0, 1)."""
    n = int((hi - lo) / step) + 2
    return lo + step * np.arange(n, dtype=np.float32), rng.standard_normal(n).astype(np.float32)


def _build_background(sc: _Scene) -> None:
    """Sky, ground (road, markings, kerbs, sidewalks, terrain), facades with windows, far facade, edge features."""
    rng, r, lay, cv, h, w = sc.rng, sc.r, sc.lay, sc.canvas, sc.h, sc.w
    ys = np.arange(h, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(w, dtype=np.float32)[None, :] + 0.5
    dy = ys - sc.yh  # (h, 1) rows below the horizon are positive
    cv.part(SKY, M_SKY, sc.colour("sky"))  # pid 0: every pixel starts as sky

    # Ground plane: depth z and lateral x of each pixel of the rows g0: below the horizon.
    g0 = int(np.searchsorted(dy[:, 0], 0.25, side="right"))  # dy grows down the image
    zg = (sc.f * sc.cam / np.maximum(dy[g0:], 0.25)).astype(np.float32)  # (h - g0, 1)
    xg = (xs - sc.vx) * zg / sc.f  # (h - g0, w)
    (rl, rr), (el, er), (fl, fr) = sc.road, sc.edge, sc.facade
    p_road = cv.part(ROAD, M_ASPHALT, sc.colour("asphalt"))
    p_mark = cv.part(ROAD, M_MARKING, sc.colour("marking"))
    p_side = [cv.part(SIDEWALK, M_PAVING, sc.colour("paving")) for _ in range(2)]
    p_kerb = cv.part(SIDEWALK, M_KERB, sc.colour("kerb"))
    p_terr = cv.part(TERRAIN, M_GRASS, sc.colour("grass"))
    pid = np.full(xg.shape, p_terr, dtype=np.int16)  # verges; beyond the facades (only seen in gaps) terrain too
    pid[(xg >= el) & (xg < rl)] = p_side[0]
    pid[(xg > rr) & (xg <= er)] = p_side[1]
    pid[(np.abs(xg - rl) < 0.22) | (np.abs(xg - rr) < 0.22)] = p_kerb
    road = (xg >= rl) & (xg <= rr)
    pid[road] = p_road
    # Lane markings: a dashed centre line, solid edge lines, sometimes a zebra crossing.
    centre = 0.5 * (rl + rr)
    mark = (np.abs(xg - centre) < 0.09) & (_frac(zg, lay.dash_period) < 1 / 3)
    mark |= (np.abs(xg - (rl + 0.35)) < 0.08) | (np.abs(xg - (rr - 0.35)) < 0.08)
    if r.uniform() < lay.zebra_prob:
        z0 = r.uniform(8.0, 25.0)
        mark |= (zg > z0) & (zg < z0 + 3.0) & (_frac(xg, 1.0) < 0.5)
    pid[road & mark] = p_mark
    cv.pid[g0:] = pid
    cv.depth[g0:] = zg
    cv.u[g0:] = xg
    cv.v[g0:] = zg

    # Far facade across the end of the street.
    ze = sc.z_end
    xe = (xs - sc.vx) * ze / sc.f
    ye = sc.cam - dy * ze / sc.f
    end_h = r.uniform(*lay.building_height)
    far = (xe >= fl) & (xe <= fr) & (ye >= 0) & (ye <= end_h)
    p_end = cv.part(BUILDING, M_FACADE, sc.colour("facade"), shade=0.9)
    cv.pid[far] = p_end
    cv.depth[far] = ze

    for side, dist in ((0, fl), (1, fr)):
        _build_facades(sc, side, dist, xs, dy)
        if r.uniform() < 0.85:
            # Just inside the sidewalk's outer edge: always in front of the facades.
            _build_edge(sc, side, sc.edge[side] + 0.15 if side == 0 else sc.edge[side] - 0.15, xs, dy)

    # Cast shadow of the left buildings over the left part of the street (target lighting only); sprites
    # standing in it are darkened too (``_shadow_factor``).
    if sc.shadow:
        kz, kv = _noise1d(rng, 0.0, 200.0, 6.0)
        base = rl + r.uniform(0.0, 0.8) * (rr - rl)
        sc.shadow_edge = (base, kz, kv)
        sc.ground_shadow = np.zeros((h, w), dtype=bool)
        sc.ground_shadow[g0:] = xg < base + 1.2 * np.interp(zg, kz, kv)


def _side_columns(sc: _Scene, side: int) -> tuple[int, int]:
    """Columns ``c0:c1`` whose centres lie more than half a pixel left (side 0) or right (1) of the vanishing point."""
    if side == 0:
        return 0, max(0, min(sc.w, math.ceil(sc.vx - 1.0)))
    return max(0, min(sc.w, math.floor(sc.vx) + 1)), sc.w


def _build_facades(sc: _Scene, side: int, dist: float, xs: np.ndarray, dy: np.ndarray) -> None:
    """Facade blocks on the plane ``x = dist`` (negative: left side), from the camera to the end of the street."""
    rng, r, lay, cv = sc.rng, sc.r, sc.lay, sc.canvas
    c0, c1 = _side_columns(sc, side)
    if c1 <= c0:
        return
    z = sc.f * abs(dist) / np.abs(xs[:, c0:c1] - sc.vx)  # (1, n) depth of each column of this side
    y = sc.cam - dy * z / sc.f  # (h, n) height above the ground
    # Blocks along the street.
    bounds, heights, pids, wpids, spids, kinds, floors, spacing, fill = [0.0], [], [], [], [], [], [], [], []
    shade = sc.look.side_shade[side]
    while bounds[-1] < sc.z_end:
        bounds.append(bounds[-1] + r.uniform(*lay.building_length))
        trees = r.uniform() < lay.trees_block_prob
        kinds.append(trees)
        if trees:
            heights.append(r.uniform(4.0, 9.0))
            pids.append(cv.part(VEGETATION, M_FOLIAGE, sc.colour("foliage"), shade=shade))
            wpids.append(pids[-1])
            spids.append(pids[-1])
        else:
            heights.append(r.uniform(*lay.building_height))
            pids.append(cv.part(BUILDING, M_FACADE, sc.colour("facade"), shade=shade))
            wpids.append(cv.part(BUILDING, M_WINDOW, sc.colour("window"), shade=shade))
            # Half the buildings have dark shop windows on the ground floor: dark surfaces are not all cars.
            shop = r.uniform() < 0.5
            spids.append(cv.part(BUILDING, M_WINDOW, sc.colour("shopglass"), shade=shade) if shop else pids[-1])
        floors.append(r.uniform(*lay.floor_height))
        spacing.append(r.uniform(*lay.window_spacing))
        fill.append(r.uniform(*lay.window_fill))
    b = np.asarray(bounds, dtype=np.float32)
    k = np.clip(np.searchsorted(b, z, side="right") - 1, 0, len(heights) - 1)  # (1, w) block of each column
    top = np.asarray(heights, dtype=np.float32)[k]
    is_trees = np.asarray(kinds)[k]
    if is_trees.any():  # a ragged top line for tree masses
        kz, kv = _noise1d(rng, 0.0, sc.z_end + 1.0, 1.5)
        top = np.where(is_trees, top + 0.8 * np.interp(z, kz, kv), top)
    vis = (z < sc.z_end) & (y >= 0) & (y <= top)
    if not vis.any():
        return
    # Windows: a regular grid in facade coordinates (perspective-correct), above a ground floor.
    ul = z - b[k]
    fh = np.asarray(floors, dtype=np.float32)[k]
    ws = np.asarray(spacing, dtype=np.float32)[k]
    wf = np.asarray(fill, dtype=np.float32)[k]
    length = (b[1:] - b[:-1])[k]
    fy = _frac(y, fh)
    fx = _frac(ul, ws)
    win = (y > 0.8 * fh) & (y < top - 0.6) & (fy > 0.3) & (fy < 0.8) & (fx > 0.5 - wf / 2) & (fx < 0.5 + wf / 2)
    inner = (ul > 0.6) & (ul < length - 0.6) & ~is_trees
    win &= inner
    shop = inner & (y > 0.3) & (y < 0.7 * fh) & (fx > 0.08) & (fx < 0.92)
    pid = np.where(win, np.asarray(wpids, dtype=np.int16)[k], np.asarray(pids, dtype=np.int16)[k])
    pid = np.where(shop, np.asarray(spids, dtype=np.int16)[k], pid)
    np.copyto(cv.pid[:, c0:c1], pid, where=vis)
    np.copyto(cv.depth[:, c0:c1], np.broadcast_to(z, vis.shape), where=vis)
    np.copyto(cv.u[:, c0:c1], np.broadcast_to(ul, vis.shape), where=vis)
    np.copyto(cv.v[:, c0:c1], y, where=vis)


def _build_edge(sc: _Scene, side: int, dist: float, xs: np.ndarray, dy: np.ndarray) -> None:
    """Fence, wall and hedge segments on the plane ``x = dist`` along the sidewalk's outer edge."""
    rng, r, lay, cv = sc.rng, sc.r, sc.lay, sc.canvas
    c0, c1 = _side_columns(sc, side)
    if c1 <= c0:
        return
    z = sc.f * abs(dist) / np.abs(xs[:, c0:c1] - sc.vx)  # (1, n)
    y = sc.cam - dy * z / sc.f  # (h, n)
    pf, pw, ph = lay.edge_probs
    total = pf + pw + ph
    kz, kv = _noise1d(rng, 0.0, sc.z_end + 1.0, 0.7)
    zpos = r.uniform(2.0, 15.0)
    shade = sc.look.side_shade[side]
    while zpos < sc.z_end:
        length = r.uniform(6.0, 30.0)
        z0, z1 = zpos, min(zpos + length, sc.z_end)
        zpos = z1 + r.uniform(2.0, 25.0)
        pick = r.uniform() * (total + 0.4)
        seg = (z >= z0) & (z < z1)  # (1, n)
        if not seg.any():
            continue
        if pick < pf:
            hgt = r.uniform(1.0, 2.0)
            post = r.uniform(1.8, 3.0)
            slat, gap = lay.fence_slat, r.uniform(*lay.fence_gap)
            pattern = (_frac(z, post) < 0.12 / post) | (_frac(z, slat + gap) < slat / (slat + gap))
            rails = (np.abs(y - hgt + 0.05) < 0.05) | (np.abs(y - 0.25) < 0.05)
            mask = seg & (y >= 0) & (y <= hgt) & (pattern | rails)
            p = cv.part(FENCE, M_FENCE, sc.colour("fence"), shade=shade)
        elif pick < pf + pw:
            hgt = r.uniform(0.8, 2.2)
            mask = seg & (y >= 0) & (y <= hgt)
            p = cv.part(WALL, M_CONCRETE, sc.colour("concrete"), shade=shade)
        elif pick < total:
            hgt = r.uniform(0.8, 1.8)
            mask = seg & (y >= 0) & (y <= hgt + 0.25 * np.interp(z, kz, kv))
            p = cv.part(VEGETATION, M_FOLIAGE, sc.colour("foliage"), shade=shade)
        else:
            continue
        cv.pid[:, c0:c1][mask] = p
        np.copyto(cv.depth[:, c0:c1], np.broadcast_to(z, mask.shape), where=mask)


_SHADOW = 0.62  # brightness of the ground in a cast shadow
_SHADOW_SPRITE = 0.75  # of sprites standing in it (their upper parts are often out of the shadow)


def _shadow_factor(sc: _Scene, x: float, z: float) -> float:
    if sc.ground_shadow is None:
        return 1.0
    base, kz, kv = sc.shadow_edge
    return _SHADOW_SPRITE if x < base + 1.2 * float(np.interp(z, kz, kv)) else 1.0


# Sprites: each returns nothing and paints its parts (far to near order is handled by the caller).


def _draw_car(sc: _Scene, x: float, z: float) -> None:
    """A car seen from behind at lateral ``x``, rear at depth ``z``: boot and bumper, a cabin set back by the
    boot's length, wheels, rear lights, and the side facing the camera axis when the car is off-axis."""
    r, cv = sc.r, sc.canvas
    round_ = sc.lay.car_shape == "round"
    k = r.uniform(*sc.lay.car_scale)
    van = round_ and r.uniform() < 0.15
    half = 0.9 * k
    length = r.uniform(3.9, 4.6) * k
    body_top = (1.15 if van else r.uniform(0.85, 0.95)) * k
    roof = (1.95 if van else r.uniform(1.35, 1.48) if round_ else r.uniform(1.5, 1.6)) * k
    boot = 0.1 * k if van else (0.85 * k if round_ else 0.4 * k)  # the cabin starts this far from the rear
    hood = 1.1 * k
    slope = 0.8 if round_ else 0.3  # metres of cabin shortening per metre of height (rear/front screens)
    inset = 0.3 if round_ else 0.12  # how much the cabin narrows at the roof, seen from behind
    paint = sc.colour("carpaint")
    shaded = _shadow_factor(sc, x, z)
    p_body = cv.part(CAR, M_CARPAINT, paint, z, shaded)
    p_top = cv.part(CAR, M_CARPAINT, paint, z, 1.12 * shaded)
    p_side = cv.part(CAR, M_CARPAINT, paint, z, 0.78 * shaded)
    p_glass = cv.part(CAR, M_CARGLASS, sc.colour("carglass"), z, shaded)
    p_wheel = cv.part(CAR, M_RUBBER, sc.colour("rubber"), z, shaded)
    p_lamp = cv.part(CAR, M_LAMP, sc.colour("taillight"), z, 1.0)

    # Side face (the one facing the camera axis) when the car is off-axis: drawn in its own plane.
    xs_ = x - half if x > 0 else x + half
    if abs(xs_) > 0.3:
        s0, s1 = sc.f / z, sc.f / (z + length)
        xa, xb = sc.vx + s0 * xs_, sc.vx + s1 * xs_
        x0, x1 = max(int(math.floor(min(xa, xb))), 0), min(int(math.ceil(max(xa, xb))) + 1, sc.w)
        y0 = max(int(math.floor(min(sc.yh + s0 * (sc.cam - roof), sc.yh + s1 * (sc.cam - roof)))), 0)
        y1 = min(int(math.ceil(sc.yh + s0 * sc.cam)) + 1, sc.h)
        if x1 > x0 and y1 > y0:
            px = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5
            py = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5
            off = px - sc.vx
            zz = sc.f * xs_ / np.where(np.abs(off) < 1e-3, 1e-3, off)  # (1, w) depth along the side plane
            yy = sc.cam - (py - sc.yh) * zz / sc.f  # (h, w) height above the ground
            lz = zz - z  # (1, w) metres from the rear
            inside = (lz >= 0) & (lz <= length)
            body = inside & (yy >= 0.25 * k) & (yy <= body_top)
            if round_:  # rounded boot and bonnet corners
                body &= (yy <= body_top - 0.25 * k) | ((lz > 0.35 * k) & (lz < length - 0.35 * k))
            c0 = boot + (yy - body_top) * slope
            c1 = length - hood - (yy - body_top) * slope
            cabin = inside & (yy > body_top) & (yy <= roof) & (lz >= c0) & (lz <= c1)
            glass = cabin & (yy > body_top + 0.08 * k) & (yy < roof - 0.08 * k) & (lz >= c0 + 0.1) & (lz <= c1 - 0.1)
            glass &= np.abs((lz - c0) / np.maximum(c1 - c0, 1e-3) - 0.5) > 0.04  # the B-pillar
            rw = 0.33 * k
            wheel = (lz - 0.85 * k) ** 2 + (yy - rw) ** 2 < rw * rw
            wheel |= (lz - length + 0.85 * k) ** 2 + (yy - rw) ** 2 < rw * rw
            box = (y0, y1, x0, x1)
            cv.paint(box, body | cabin, p_side)
            cv.paint(box, glass, p_glass)
            cv.paint(box, wheel & inside, p_wheel)

    # Rear face of the cabin, set back by the boot.
    zc = z + boot
    sp = sc.sprite(x, zc, half, roof)
    if sp is not None:
        box, dx, y, _ = sp
        adx = np.abs(dx)
        t = np.clip((y - body_top) / max(roof - body_top, 1e-3), 0.0, 1.0)
        cab_half = half - 0.06 - inset * t * half / 0.9
        cabin = (y > body_top - 0.05) & (y <= roof) & (adx <= cab_half)
        glass = cabin & (y > body_top + 0.07 * k) & (y < roof - 0.07 * k) & (adx <= cab_half - 0.07)
        cv.paint(box, cabin, p_body)
        cv.paint(box, glass, p_glass)

    # Rear face of the body with the boot lid seen from above (the camera is higher than the boot).
    sp = sc.sprite(x, z, half, roof)
    if sp is None:
        return
    box, dx, y, _ = sp
    adx = np.abs(dx)
    wheel = (y <= 0.35 * k) & (adx >= half - 0.32 * k) & (adx <= half - 0.04)
    if round_:
        mid, hh = 0.5 * (0.25 * k + body_top), 0.5 * (body_top - 0.25 * k)
        body = (adx / half) ** 4 + ((y - mid) / hh) ** 4 <= 1.0
    else:
        body = (y >= 0.25 * k) & (y <= body_top) & (adx <= half)
    lid_top = sc.cam - (sc.cam - body_top) * z / zc  # height, in this sprite's frame, of the lid's far edge
    lid = (y > body_top - 0.03) & (y <= lid_top) & (adx <= half * (1.0 - 0.5 * (1.0 - z / zc)) - 0.03)
    lamp = (y > body_top - 0.25 * k) & (y < body_top - 0.1 * k) & (adx > half - 0.3 * k) & (adx < half - 0.06)
    cv.paint(box, lid, p_top)
    cv.paint(box, wheel, p_wheel)
    cv.paint(box, body, p_body)
    cv.paint(box, lamp & body, p_lamp)


def _draw_person(sc: _Scene, x: float, z: float) -> None:
    r, cv, lay = sc.r, sc.canvas, sc.lay
    hp = r.uniform(*lay.person_height)
    sw = r.uniform(*lay.person_width)
    sp = sc.sprite(x, z, sw / 2 + 0.12, hp)
    if sp is None:
        return
    box, dx, y, s = sp
    px = 0.5 / s  # half a pixel in metres: thin limbs still cover one pixel
    shaded = _shadow_factor(sc, x, z)
    p_pants = cv.part(PERSON, M_CLOTH, sc.colour("pants"), z, shaded)
    p_shirt = cv.part(PERSON, M_CLOTH, sc.colour("cloth"), z, shaded)
    p_skin = cv.part(PERSON, M_SKIN, sc.colour("skin"), z, shaded)
    p_hair = cv.part(PERSON, M_HAIR, sc.colour("hair"), z, shaded)
    adx = np.abs(dx)
    hy, hr = 0.9 * hp, 0.075 * hp
    head = ((dx / (0.8 * hr)) ** 2 + ((y - hy) / hr) ** 2) <= 1.0
    if lay.person_shape == "block":
        legs = (y >= 0) & (y < 0.48 * hp) & (adx <= sw * 0.32)
        torso = (y >= 0.46 * hp) & (y < 0.83 * hp) & (adx <= sw / 2)
        arms = np.zeros_like(torso)
    else:
        stride = r.uniform(0.0, 0.12)  # walking: the legs spread towards the feet
        spread = 0.07 + stride * (1.0 - np.clip(y / (0.48 * hp), 0.0, 1.0))
        legs = (y >= 0) & (y < 0.5 * hp) & (np.abs(adx - spread) <= np.maximum(0.055, px))
        taper = sw / 2 - 0.05 * (0.8 * hp - y) / (0.35 * hp)
        torso = (y >= 0.47 * hp) & (y < 0.82 * hp) & (adx <= taper)
        arms = (y >= 0.5 * hp) & (y < 0.8 * hp) & (adx > sw / 2) & (adx <= sw / 2 + np.maximum(0.06, px))
    hair = head & (y > hy + 0.3 * hr)
    cv.paint(box, legs, p_pants)
    cv.paint(box, torso, p_shirt)
    cv.paint(box, arms, p_shirt)
    cv.paint(box, head, p_skin)
    cv.paint(box, hair, p_hair)


def _draw_pole(sc: _Scene, x: float, z: float, towards_road: float) -> None:
    r, cv, lay = sc.r, sc.canvas, sc.lay
    hgt = r.uniform(3.2, 5.2)
    kind = "light" if r.uniform() < lay.light_prob else ("sign" if r.uniform() < 0.75 else "none")
    arm = kind == "light" and r.uniform() < lay.light_on_arm
    arm_len = r.uniform(1.5, 3.5) if arm else 0.0
    reach = arm_len + 0.6
    sp = sc.sprite(x, z, reach, hgt + 0.3)
    if sp is None:
        return
    box, dx, y, s = sp
    px = 0.5 / s
    p_pole = cv.part(POLE, M_POLE, sc.colour("pole"), z)
    pole = (np.abs(dx) <= max(lay.pole_width / 2, px)) & (y >= 0) & (y <= hgt)
    lx = towards_road * arm_len  # where the light or sign hangs, relative to the pole
    if arm:
        bar = (y >= hgt - 0.12) & (y <= hgt + max(0.0, px - 0.06))  # at least one pixel thick
        pole |= bar & (dx * towards_road >= 0) & (np.abs(dx) <= arm_len)
    cv.paint(box, pole, p_pole)
    ddx = dx - lx
    if kind == "light":
        top = hgt - 0.12 if arm else hgt + 0.25
        bh, bw = 0.95, 0.16
        boxm = (np.abs(ddx) <= max(bw, px)) & (y <= top) & (y >= top - bh)
        p_box = cv.part(LIGHT, M_LIGHTBOX, sc.colour("lightbox"), z - 0.05)
        cv.paint(box, boxm, p_box)
        lamp = int(r.integers(3))
        cy = top - bh * (0.2 + 0.3 * lamp)
        lampm = (ddx**2 + (y - cy) ** 2) <= (0.1) ** 2
        p_lamp = cv.part(LIGHT, M_LAMP, sc.colour("lamp"), z - 0.06)
        cv.paint(box, lampm, p_lamp)
    elif kind == "sign":
        shape = lay.sign_shapes[int(r.integers(len(lay.sign_shapes)))]
        rad = r.uniform(*lay.sign_size)
        cy = hgt - rad
        ax, ay = np.abs(ddx), np.abs(y - cy)
        if shape == "rect":
            m = (ax <= rad * 0.9) & (ay <= rad * 0.7)
        elif shape == "circle":
            m = ax**2 + ay**2 <= rad * rad
        elif shape == "diamond":
            m = ax + ay <= rad
        else:  # triangle, point down
            m = (y - cy <= 0.6 * rad) & (y - cy >= -rad) & (ax <= (y - cy + rad) * 0.6)
        p_sign = cv.part(SIGN, M_SIGN, sc.colour("sign"), z - 0.05)
        cv.paint(box, m | (m.any() & (ax <= px) & (ay <= px)), p_sign)


def _draw_tree(sc: _Scene, x: float, z: float) -> None:
    r, cv = sc.r, sc.canvas
    trunk_h = r.uniform(1.8, 3.0)
    rad = r.uniform(1.2, 2.3)
    cy = trunk_h + 0.8 * rad
    sp = sc.sprite(x, z, 1.35 * rad, cy + 1.35 * rad)
    if sp is None:
        return
    box, dx, y, s = sp
    p_trunk = cv.part(VEGETATION, M_BARK, sc.colour("bark"), z)
    p_crown = cv.part(VEGETATION, M_FOLIAGE, sc.colour("foliage"), z)
    trunk = (np.abs(dx) <= max(0.14, 0.5 / s)) & (y >= 0) & (y <= cy)
    ddy = y - cy
    d2 = dx**2 + ddy**2
    if sc.lay.tree_shape == "round":
        crown = d2 <= rad * rad
    else:  # lobed, taller than wide
        theta = np.arctan2(ddy, dx)
        a1, a2, a3 = (r.uniform(0, 2 * np.pi), r.uniform(0, 2 * np.pi), r.uniform(0, 2 * np.pi))
        rr = rad * (1.0 + 0.18 * np.sin(3 * theta + a1) + 0.1 * np.sin(5 * theta + a2) + 0.06 * np.sin(9 * theta + a3))
        crown = dx**2 + (ddy / 1.25) ** 2 <= rr * rr
    cv.paint(box, trunk, p_trunk)
    cv.paint(box, crown, p_crown)


def _populate(sc: _Scene) -> None:
    """Place cars, persons, poles and trees, then draw them far to near."""
    r, lay = sc.r, sc.lay
    (rl, rr), (el, er) = sc.road, sc.edge
    items: list[tuple[float, Callable[[], None]]] = []
    zmax = min(sc.z_end - 5.0, 70.0)
    cars: list[tuple[float, float]] = []
    for _ in range(int(r.integers(lay.n_cars[0], lay.n_cars[1] + 1))):
        for _try in range(4):
            lane = r.uniform()
            if lane < 0.3:
                x = rl + 1.1
            elif lane < 0.6:
                x = rr - 1.1
            else:
                x = rl + (rr - rl) * (0.25 if r.uniform() < 0.5 else 0.75)
            z = r.uniform(5.0, zmax)
            if all(abs(x - cx) > 2.0 or abs(z - cz) > 5.5 for cx, cz in cars):
                cars.append((x, z))
                items.append((z, functools.partial(_draw_car, sc, x, z)))
                break
    for _ in range(int(r.integers(lay.n_persons[0], lay.n_persons[1] + 1))):
        if r.uniform() < lay.persons_on_road:
            x = r.uniform(rl + 0.5, rr - 0.5)
        elif r.uniform() < 0.5:
            x = r.uniform(el + 0.3, rl - 0.3)
        else:
            x = r.uniform(rr + 0.3, er - 0.3)
        z = r.uniform(4.0, 45.0)
        items.append((z, functools.partial(_draw_person, sc, x, z)))
    for _ in range(int(r.integers(lay.n_poles[0], lay.n_poles[1] + 1))):
        left = r.uniform() < 0.5
        x = rl - 0.45 if left else rr + 0.45
        z = r.uniform(5.0, 50.0)
        items.append((z, functools.partial(_draw_pole, sc, x, z, 1.0 if left else -1.0)))
    for _ in range(int(r.integers(lay.n_trees[0], lay.n_trees[1] + 1))):
        left = r.uniform() < 0.5
        if left:
            x = sc.facade[0] + 0.8 if sc.terrain[0] > 1.5 else el + 0.6
        else:
            x = sc.facade[1] - 0.8 if sc.terrain[1] > 1.5 else er - 0.6
        z = r.uniform(6.0, 60.0)
        items.append((z, functools.partial(_draw_tree, sc, x, z)))
    for _, draw in sorted(items, key=lambda it: -it[0]):
        draw()


# --------------------------------------------------------------------------------------------------------------
# Rendering


@functools.lru_cache(maxsize=64)
def _interp_index(n: int, cell: int) -> tuple[np.ndarray, np.ndarray]:
    """Grid index and smoothstep weight of each of ``n`` pixel centres for a noise grid of ``cell`` pixels."""
    t = (np.arange(n, dtype=np.float32) + 0.5) / cell
    i0 = np.floor(t).astype(np.intp)
    fr = t - i0
    return i0, (fr * fr * (3.0 - 2.0 * fr)).astype(np.float32)


def _value_noise(rng: Rng, h: int, w: int, cell: int) -> np.ndarray:
    """Smooth noise ``(h, w)`` float32 with features of about ``cell`` pixels (std roughly 0.6)."""
    g = rng.standard_normal((h // cell + 2, w // cell + 2), dtype=np.float32)
    iy, fy = _interp_index(h, cell)
    ix, fx = _interp_index(w, cell)
    rows = g[iy] * (1.0 - fy)[:, None] + g[iy + 1] * fy[:, None]  # (h, grid width)
    return rows[:, ix] * (1.0 - fx) + rows[:, ix + 1] * fx


def _blur(img: np.ndarray) -> np.ndarray:
    """One pass of a separable [1, 2, 1] / 4 blur over ``(3, h, w)`` with edge replication."""
    t = np.empty_like(img)
    np.add(img[:, :-2], img[:, 2:], out=t[:, 1:-1])
    t[:, 1:-1] += img[:, 1:-1]
    t[:, 1:-1] += img[:, 1:-1]
    t[:, 0] = 3.0 * img[:, 0] + img[:, 1]
    t[:, -1] = 3.0 * img[:, -1] + img[:, -2]
    out = np.empty_like(img)
    np.add(t[:, :, :-2], t[:, :, 2:], out=out[:, :, 1:-1])
    out[:, :, 1:-1] += t[:, :, 1:-1]
    out[:, :, 1:-1] += t[:, :, 1:-1]
    out[:, :, 0] = 3.0 * t[:, :, 0] + t[:, :, 1]
    out[:, :, -1] = 3.0 * t[:, :, -1] + t[:, :, -2]
    out *= 0.0625
    return out


_SQRT12 = math.sqrt(12.0)


def _unit_noise(rng: Rng, shape: tuple[int, ...], std: float) -> np.ndarray:
    """Zero-mean uniform noise with standard deviation ``std``, float32.

    Random bytes read as int8 are 3x cheaper than ``Generator.random`` and 6x cheaper than Gaussian samples;
    256 levels are plenty for image noise.
    """
    n = int(np.prod(shape))
    return np.frombuffer(rng.bytes(n), dtype=np.int8).reshape(shape) * np.float32(std * _SQRT12 / 256.0)


def _render(sc: _Scene) -> tuple[np.ndarray, np.ndarray]:
    """Look up labels and colours from the part table, then apply the domain's textures and camera.

    Per-surface effects (shading, colour cast, gain, gamma) are applied to the part table, before the per-pixel
    lookup; the per-pixel work is then a few passes over the image. It runs channel-first ``(3, h, w)``
    because numpy is several times faster on long inner loops than on a last axis of 3. Values are in 0..255.
    """
    rng, r, look, cv, h, w = sc.rng, sc.r, sc.look, sc.canvas, sc.h, sc.w
    pid = cv.pid.astype(np.intp)
    lab = np.asarray(cv.cls, dtype=np.uint8)[pid]
    # Per-object colour variation: per-channel jitter plus a shared brightness jitter, for every colour at once.
    jit = rng.standard_normal((len(sc.colours), 4), dtype=np.float32) * look.jitter
    colours = np.asarray(sc.colours, dtype=np.float32) + jit[:, :3] + jit[:, 3:]
    col_tab = np.clip(colours[np.asarray(cv.col, dtype=np.intp)], 0.0, 1.0).T * np.asarray(cv.shade, dtype=np.float32)
    if look.textured:  # colour cast, exposure and gamma of the camera (on the table: (3, parts))
        gain = r.uniform(*look.gain)
        cast = [(look.cast[c] + r.normal(0.0, look.cast_jitter)) * gain for c in range(3)]
        col_tab = np.clip(col_tab * np.asarray(cast, dtype=np.float32)[:, None], 0.0, 1.0) ** r.uniform(*look.gamma)
    col_tab = np.ascontiguousarray(col_tab * 255.0)
    img = np.empty((3, h, w), dtype=np.float32)
    for c in range(3):
        np.take(col_tab[c], pid, out=img[c])
    if look.textured:
        mat_tab = np.asarray(cv.mat, dtype=np.intp)
        mat = mat_tab[pid]
        amp = _TEX_AMP[mat_tab] * look.texture  # (parts, 3)
        low = _value_noise(rng, h, w, 14)
        mult = _unit_noise(rng, (h, w), 1.0) * amp[:, 0][pid]
        mult += _value_noise(rng, h, w, 3) * amp[:, 1][pid]
        mult += low * amp[:, 2][pid]
        mult += 1.0
        # World-aligned patterns on the pixels they concern only: facade bricks, sidewalk tiles.
        flat = mult.reshape(-1)
        idx = np.flatnonzero(mat == M_FACADE)
        if idx.size:
            u, v = cv.u.reshape(-1)[idx], cv.v.reshape(-1)[idx]
            course = np.floor(v / 0.35)
            joint = (_frac(v, 0.35) < 0.15) | (_frac(u + 0.3 * (course - 2 * np.floor(course / 2)), 0.6) < 0.08)
            flat[idx[joint]] -= 0.18
        idx = np.flatnonzero(mat == M_PAVING)
        if idx.size:
            u, v = cv.u.reshape(-1)[idx], cv.v.reshape(-1)[idx]
            joint = (_frac(u, 0.5) < 0.12) | (_frac(v, 0.5) < 0.12)
            flat[idx[joint]] -= 0.2
        if sc.ground_shadow is not None:
            mult[sc.ground_shadow] *= _SHADOW
        img *= mult
        idx = np.flatnonzero(mat == M_SKY)
        if idx.size:  # brighter towards the horizon, with clouds
            rows = (idx // w).astype(np.float32)
            grad = 0.85 + 0.2 * np.clip(rows / max(sc.yh, 1.0), 0.0, 1.0)
            cover = np.clip(low.reshape(-1)[idx] * r.uniform(0.3, 1.0), 0.0, 1.0)
            sky = img.reshape(3, -1)[:, idx] * grad
            img.reshape(3, -1)[:, idx] = sky + (235.0 - sky) * cover
    if look.fog is not None:
        obj = np.asarray(cv.pdepth, dtype=np.float32)[pid]
        depth = np.where(obj > 0, obj, cv.depth)  # sprites carry their depth in the part table
        t = np.exp(-r.uniform(*look.fog) * depth)
        grey = r.uniform(0.7, 0.85) * 255.0
        dark = r.uniform(*look.fog_dark)
        for c in range(3):
            air = grey + r.normal(0.0, 5.0)
            img[c] = (img[c] * t + air * (1.0 - t)) * dark
    for _ in range(look.blur):
        img = _blur(img)
    if look.noise[1] > 0:
        img += _unit_noise(rng, (3, h, w), r.uniform(*look.noise) * 255.0)
    img += 0.5
    np.clip(img, 0.0, 255.0, out=img)
    return img.astype(np.uint8), lab


def _check_size(size: Any) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"synthetic size: expected (H, W), two integers, got {size!r}") from None
    if h < 8 or w < 8:
        raise ValueError(f"synthetic size: expected (H, W) of at least (8, 8), got {(h, w)}")
    return h, w


def generate_scene(domain: str, rng: Rng, *, size: tuple[int, int] = DEFAULT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """One scene of ``domain`` drawn with ``rng``.

    Returns:
        image: ``(3, H, W)`` uint8 RGB (channel-first, as in a dataset sample).
        mask: ``(H, W)`` uint8 trainIds (every pixel is labelled; no 255 is produced).
    """
    if domain not in _DOMAINS:
        raise ValueError(f"synthetic domain: expected one of {list(DOMAINS)}, got {domain!r}")
    h, w = _check_size(size)
    lay, look = _DOMAINS[domain]
    sc = _Scene(rng, lay, look, h, w)
    _build_background(sc)
    _populate(sc)
    return _render(sc)


# --------------------------------------------------------------------------------------------------------------
# Dataset


class SyntheticDataset(torch.utils.data.Dataset):
    """Procedural street scenes of one domain and split, generated on the fly.

    Args:
        domain: ``"source"``, ``"target"`` or ``"shift"`` (see the module docstring).
        split: ``"train"``, ``"val"`` (for choosing settings) or ``"test"`` (for reporting); the split enters the
            RNG seed, so no two splits share a scene.
        size: ``(H, W)`` of the generated images.
        length: number of samples; ``None`` takes ``DEFAULT_LENGTHS[split]`` (train 1000, val 200, test 200).
        seed: benchmark seed; sample ``i`` is drawn from ``np.random.default_rng([seed, domain, split, i])``.
        with_labels: when False, samples have no ``"mask"`` key (adaptation never sees target labels).
        transform: called on the sample dict, when given.

    A sample is ``{"image": uint8 (3, H, W), "mask": uint8 (H, W), "name": "<domain>_<split>_<index>"}`` (torch
    tensors), then ``transform(sample)``.
    """

    def __init__(
        self,
        domain: str,
        split: str = "train",
        *,
        size: Sequence[int] = DEFAULT_SIZE,
        length: int | None = None,
        seed: int = 0,
        with_labels: bool = True,
        transform: Callable[[dict], Any] | None = None,
    ) -> None:
        if domain not in _DOMAINS:
            raise ValueError(f"synthetic dataset: unknown domain {domain!r}; expected one of {list(DOMAINS)}")
        if split not in SPLITS:
            raise ValueError(f"synthetic dataset: unknown split {split!r}; expected one of {list(SPLITS)}")
        size = _check_size(size)
        length = DEFAULT_LENGTHS[split] if length is None else int(length)
        if length < 0:
            raise ValueError(f"synthetic dataset: length must be >= 0, got {length}")
        if int(seed) < 0:
            raise ValueError(f"synthetic dataset: seed must be >= 0, got {seed}")
        self.domain, self.split, self.size, self.length, self.seed = domain, split, size, length, int(seed)
        self.with_labels = with_labels
        self.transform = transform
        self.classes: ClassSpec = CITYSCAPES19
        # Provenance, as on the datasets of ``sfdaseg.data.datasets`` (for reports).
        self.kind, self.root, self.protocol = "synthetic", domain, 19

    @property
    def names(self) -> list[str]:
        return [self.name(i) for i in range(self.length)]

    def name(self, index: int) -> str:
        return f"{self.domain}_{self.split}_{index:05d}"

    def __len__(self) -> int:
        return self.length

    def rng(self, index: int) -> Rng:
        return np.random.default_rng([self.seed, _DOMAIN_CODES[self.domain], SPLITS[self.split], index])

    def scene(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The numpy scene of ``index``: ``(3, H, W)`` uint8 image and ``(H, W)`` uint8 mask."""
        if not -self.length <= index < self.length:
            raise IndexError(f"synthetic dataset: index {index} out of range for length {self.length}")
        index %= self.length
        return generate_scene(self.domain, self.rng(index), size=self.size)

    def __getitem__(self, index: int) -> Any:
        image, mask = self.scene(index)
        sample: dict[str, Any] = {
            "image": torch.from_numpy(image),
            "name": self.name(index % self.length),
        }
        if self.with_labels:
            sample["mask"] = torch.from_numpy(mask)
        return self.transform(sample) if self.transform is not None else sample

    def __repr__(self) -> str:
        return (
            f"SyntheticDataset(domain={self.domain!r}, split={self.split!r}, size={self.size}, "
            f"length={self.length}, seed={self.seed}, with_labels={self.with_labels})"
        )


def write_folder_dataset(
    root: str | Path,
    *,
    domain: str,
    split: str = "train",
    length: int | None = None,
    size: Sequence[int] = DEFAULT_SIZE,
    seed: int = 0,
) -> Path:
    """Write scenes in the folder-dataset layout and return ``root``.

    Layout: ``root/images/<name>.png`` (RGB), ``root/masks/<name>.png`` (uint8 trainIds, 255 = ignore) and
    ``root/classes.yaml`` (``names``, ``palette``, ``ignore_index: 255``).
    """
    import yaml
    from PIL import Image

    ds = SyntheticDataset(domain, split, size=size, length=length, seed=seed)
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(len(ds)):
        image, mask = ds.scene(i)
        # uint8 (H, W, 3) is saved as RGB and uint8 (H, W) as 8-bit grey ("L"), losslessly.
        Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0))).save(root / "images" / f"{ds.name(i)}.png")
        Image.fromarray(mask).save(root / "masks" / f"{ds.name(i)}.png")
    spec = ds.classes
    with open(root / "classes.yaml", "w") as f:
        yaml.safe_dump(
            {"names": list(spec.names), "palette": [list(c) for c in spec.colors], "ignore_index": spec.ignore_index},
            f,
            sort_keys=False,
        )
    return root
