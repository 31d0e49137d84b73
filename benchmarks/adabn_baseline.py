"""AdaBN baseline: a source model's BatchNorm statistics re-estimated on unlabelled target images, nothing trained.

The cheapest source-free adaptation (Li et al. 2016): every BatchNorm layer's running mean and variance are
replaced by the cumulative statistics of the target training images (train-mode forward passes, no gradient,
no weight changes). It tells how much of a recipe's gain only comes from BN statistics (``sfda_liu`` keeps the
generated images out of the target model's statistics, so part of its gain is this one).

    python benchmarks/adabn_baseline.py runs/demo/source/model.ckpt

Prints target-val and shift-val mIoU before and after (200 images each, as ``sfdaseg bench`` scores). Target
labels are read only for that scoring.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from sfdaseg.config import EvalConfig
from sfdaseg.data.transforms import to_model_input
from sfdaseg.models import load_model
from sfdaseg.runs.common import eval_loader, evaluate_model

SYNTHETIC = {"size": [128, 256], "length": 200}
SPLITS = {"target": "synthetic:target:val", "shift": "synthetic:shift:val"}


def score(model: torch.nn.Module, device: torch.device) -> dict[str, float]:
    return {k: evaluate_model(model, eval_loader(v, resize=None, batch_size=16, num_workers=0, synthetic=SYNTHETIC),
                              device=device, eval_cfg=EvalConfig()).to_dict()["miou"] for k, v in SPLITS.items()}


@torch.no_grad()
def adabn(model: torch.nn.Module, target: str, *, images: int, device: torch.device) -> int:
    """Re-estimate every BatchNorm layer's running statistics on ``images`` target images; returns the layer count."""
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over every batch, not an EMA
    model.train()
    loader = eval_loader(target, resize=None, batch_size=16, num_workers=0, synthetic={**SYNTHETIC, "length": images})
    for batch in loader:
        model(to_model_input(batch["image"].to(device)))
    model.eval()
    return len(layers)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--target", default="synthetic:target:train", help="unlabelled target images (labels not read)")
    ap.add_argument("--images", type=int, default=400, help="target images for the statistics")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    model = load_model(args.checkpoint)[0].to(device).eval()
    before = score(model, device)
    n = adabn(model, args.target, images=args.images, device=device)
    if n == 0:
        sys.exit(f"error: {args.checkpoint} has no BatchNorm layer with running statistics: AdaBN does not apply")
    after = score(model, device)
    cmd = "python benchmarks/adabn_baseline.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"# AdaBN on {args.checkpoint} ({n} BatchNorm layers, {args.images} target images)\n\nCommand: `{cmd}`\n")
    print("| model | target mIoU | shift mIoU |\n|---|---:|---:|")
    print(f"| source | {before['target']:.2f} | {before['shift']:.2f} |")
    print(f"| source + AdaBN | {after['target']:.2f} | {after['shift']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
