"""Imbalanced classes in source training: a folder benchmark of thin structures, and the imbalance tools measured.

The benchmark (written with :func:`write_benchmark`): 128x128 images of a textured surface (plaster, wood grain
or concrete, random per image) crossed by thin structures of four classes, 1-3 pixels wide, about 7 % of the
pixels in all: ``crack`` (a dark random walk), ``wire`` (a straight, grey line with a highlight), ``seam`` (a
dashed light line) and ``rust`` (small orange-brown spots). Everything else is ``background``. Labels are exact
by construction. ``train`` 800 images, ``val`` 200, deterministic by seed; the layout is sfdaseg's folder
dataset (``images/``, ``masks/``, ``classes.yaml``).

The measurement (``--measure``): ``sfdaseg train-source`` with the ``tiny`` model at the defaults, then with each
tool on its own (``loss.class_weight=auto`` and ``=log``, ``loss.ohem=true``, ``model.aux_head=true``) and all together, for
the same schedule; the table is the val mIoU and the IoU of each thin class, with each run's command::

    python benchmarks/thin_structures.py --out runs/thin --measure --iters 1000 --device cpu
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["background", "crack", "wire", "seam", "rust"]
PALETTE = [[0, 0, 0], [220, 20, 60], [70, 130, 180], [250, 170, 30], [153, 102, 51]]
SIZE = 128


def _surface(rng: np.random.Generator, n: int) -> np.ndarray:
    """A textured background ``(n, n, 3)`` float in [0, 1]: plaster, wood grain or concrete."""
    kind = rng.integers(3)
    y, x = np.mgrid[0:n, 0:n] / n
    base = rng.uniform(0.35, 0.75, 3)
    if kind == 0:  # plaster: smooth blotches
        noise = sum(np.kron(rng.normal(0, 1, (n // s, n // s)), np.ones((s, s))) / (k + 1)
                    for k, s in enumerate((32, 16, 8)))
    elif kind == 1:  # wood grain
        noise = np.sin(2 * np.pi * (x * rng.uniform(2, 6) + 0.3 * np.sin(2 * np.pi * y * rng.uniform(1, 3)))) * 0.6
    else:  # concrete: fine speckle
        noise = rng.normal(0, 0.7, (n, n))
    img = base[None, None, :] + 0.08 * noise[..., None] + rng.normal(0, 0.02, (n, n, 3))
    return np.clip(img, 0, 1)


def _draw(mask: np.ndarray, img: np.ndarray, ys, xs, cls: int, colour, width: int) -> None:
    n = mask.shape[0]
    for y, x in zip(ys, xs):
        y0, x0 = int(y) - width // 2, int(x) - width // 2
        ya, yb, xa, xb = max(y0, 0), min(y0 + width, n), max(x0, 0), min(x0 + width, n)
        if ya < yb and xa < xb:
            mask[ya:yb, xa:xb] = cls
            img[ya:yb, xa:xb] = colour


def scene(rng: np.random.Generator, n: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """One image ``(n, n, 3)`` uint8 and its mask ``(n, n)`` uint8."""
    img = _surface(rng, n)
    mask = np.zeros((n, n), np.uint8)
    for _ in range(rng.integers(2, 5)):  # cracks: dark random walks
        y, x, a = rng.uniform(0, n), rng.uniform(0, n), rng.uniform(0, 2 * np.pi)
        ys, xs = [], []
        for _ in range(int(rng.integers(60, 160))):
            a += rng.normal(0, 0.35)
            y, x = y + np.sin(a), x + np.cos(a)
            ys.append(y), xs.append(x)
        _draw(mask, img, ys, xs, 1, img.mean() * 0.35 + rng.uniform(0, 0.05), int(rng.integers(2, 4)))
    for _ in range(rng.integers(1, 3)):  # wires: straight grey lines across
        y0, y1 = rng.uniform(0, n, 2)
        t = np.linspace(0, 1, 2 * n)
        _draw(mask, img, y0 + (y1 - y0) * t, t * (n - 1), 2, rng.uniform(0.15, 0.3) * np.ones(3), 2)
    for _ in range(rng.integers(1, 3)):  # seams: dashed light lines
        x0, x1 = rng.uniform(0, n, 2)
        t = np.linspace(0, 1, 2 * n)
        keep = (np.floor(t * 24) % 2) == 0
        _draw(mask, img, (t * (n - 1))[keep], (x0 + (x1 - x0) * t)[keep], 3, np.ones(3) * rng.uniform(0.85, 1.0), 2)
    for _ in range(rng.integers(4, 20)):  # rust spots
        cy, cx, r = rng.uniform(0, n), rng.uniform(0, n), rng.uniform(1.0, 2.5)
        yy, xx = np.mgrid[0:n, 0:n]
        spot = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        mask[spot] = 4
        img[spot] = np.array([0.6, 0.35, 0.15]) * rng.uniform(0.8, 1.1)
    img = np.clip(img + rng.normal(0, 0.015, img.shape), 0, 1)
    return (img * 255).round().astype(np.uint8), mask


def write_benchmark(out: Path, *, seed: int = 0, lengths: dict[str, int] | None = None, size: int = SIZE) -> Path:
    """``out/train`` and ``out/val`` folder datasets (skips a split that is complete)."""
    lengths = lengths or {"train": 800, "val": 200}
    for split, n in lengths.items():
        root = out / split
        if (root / ".complete").exists():
            continue
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(exist_ok=True)
        for i in range(n):
            rng = np.random.default_rng([seed, 1 if split == "val" else 0, i])
            img, mask = scene(rng, size)
            Image.fromarray(img).save(root / "images" / f"{i:04d}.png")
            Image.fromarray(mask).save(root / "masks" / f"{i:04d}.png")
        (root / "classes.yaml").write_text(f"names: {json.dumps(CLASSES)}\npalette: {json.dumps(PALETTE)}\n")
        (root / ".complete").write_text("ok\n")
    return out


TOOLS = {
    "defaults": [],
    "loss.class_weight=auto": ["loss.class_weight=auto"],
    "loss.class_weight=log": ["loss.class_weight=log"],
    "loss.ohem=true": ["loss.ohem=true"],
    "model.aux_head=true": ["model.aux_head=true"],
    "all three": ["loss.class_weight=auto", "loss.ohem=true", "model.aux_head=true"],
    "ohem + aux head": ["loss.ohem=true", "model.aux_head=true"],
}


def measure(out: Path, *, iters: int, device: str) -> str:
    from sfdaseg.cli import main as cli

    data = write_benchmark(out / "data")
    rows = []
    for name, extra in TOOLS.items():
        run = out / name.replace("=", "_").replace(".", "_").replace(" ", "_")
        argv = ["train-source", "--model", "tiny", "--data", f"folder:{data / 'train'}", "--val",
                f"folder:{data / 'val'}", "--iters", str(iters), "--out", str(run), "--device", device,
                "train.progress=false", "train.resume=true", *extra]
        timing = run / "bench_time.json"
        if not (run / "eval.json").exists():
            t = time.perf_counter()
            if cli(argv) != 0:
                raise SystemExit(f"{name}: train-source failed")
            timing.write_text(json.dumps({"wall_s": time.perf_counter() - t}))
        ev = json.loads((run / "eval.json").read_text())
        wall = json.loads(timing.read_text())["wall_s"] if timing.exists() else float("nan")
        rows.append((name, ev, wall, "sfdaseg " + shlex.join(argv)))
    head = " | ".join(CLASSES[1:])
    lines = [f"Thin structures (`benchmarks/thin_structures.py`): source val mIoU of `tiny` after {iters} iterations "
             f"(batch 8, the train-source defaults otherwise), IoU of each class in %.", "",
             f"| train-source | val mIoU | {head} |", "|---|---:|" + "---:|" * (len(CLASSES) - 1)]
    for name, ev, _, _ in rows:
        per = ev["per_class_iou"]
        cells = " | ".join(f"{per.get(c, float('nan')):.1f}" for c in CLASSES[1:])
        lines.append(f"| {name} | {ev['miou']:.1f} | {cells} |")
    lines += ["", "Commands:", ""] + [f"- {name} ({wall:.0f} s): `{cmd}`" for name, _, wall, cmd in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/thin"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--measure", action="store_true", help="also train tiny with each imbalance tool")
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--device", default="auto")
    p.add_argument("--md", type=Path, default=None, help="write the measured table here")
    args = p.parse_args(argv)
    write_benchmark(args.out / "data", seed=args.seed)
    if args.measure:
        from sfdaseg.log import setup_logging

        setup_logging()
        table = measure(args.out, iters=args.iters, device=args.device)
        print(table)
        if args.md:
            args.md.write_text(f"`python benchmarks/thin_structures.py {shlex.join(argv or sys.argv[1:])}`\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
