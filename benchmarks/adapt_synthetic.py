"""Accuracy of every adaptation recipe on the built-in benchmark (source -> target), with ablations.

Protocol: one source model and one target oracle (the same architecture trained on labelled target data, the
upper bound no recipe may use) are trained once; each recipe adapts the source model with ``--seeds`` seeds
(the source model is the fixed input of source-free adaptation; seeds vary the adaptation); the final
checkpoint of a fixed schedule is evaluated (no checkpoint is chosen with labels). Every model is evaluated on
the target val split and on the held-out shift domain. Gap closure = (adapted - source) / (oracle - source).

    python benchmarks/adapt_synthetic.py --out runs/bench_synthetic            # the README's table
    python benchmarks/adapt_synthetic.py --out /tmp/b --quick                  # a smoke test

Finished runs are reused, so an interrupted benchmark continues where it stopped. Prints a markdown table last
and writes ``results.json`` and ``results.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from sfdaseg.config import AdaptConfig, EvalConfig, TrainSourceConfig, load_config, to_dict
from sfdaseg.engine.checkpoint import load_model
from sfdaseg.engine.distributed import resolve_device
from sfdaseg.runs.adapt import run_adapt
from sfdaseg.runs.common import eval_loader, evaluate_model
from sfdaseg.runs.train_source import run_train_source

# name -> (recipe, extra overrides): the recipes with their defaults, then one row per removed part.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "selftrain": ("selftrain", []),
    "stvm": ("stvm", []),
    "diga_sf": ("diga_sf", []),
}
ABLATIONS: dict[str, tuple[str, list[str]]] = {
    "selftrain, fixed threshold 0.968": ("selftrain", ["method.policy=threshold"]),
    "selftrain, class-balanced 50%": ("selftrain", ["method.policy=class_balanced"]),
    "selftrain, no ClassMix": ("selftrain", ["method.classmix=false"]),
    "stvm, no reliability (plain CE)": ("stvm", ["method.reliability=false"]),
    "stvm, uniform ClassMix (no MOCM)": ("stvm", ["method.mocm=false"]),
    "diga_sf, no consensus (raw offline labels)": ("diga_sf", ["method.consensus=false"]),
    "diga_sf, no distillation": ("diga_sf", ["method.distill_weight=0.0"]),
}


def train_source(out: Path, split: str, args) -> Path:
    if (out / "model.ckpt").exists():
        return out / "model.ckpt"
    cfg = load_config(TrainSourceConfig, file=args.source_config, overrides=[
        f"data.train=synthetic:{split}:train", "data.val=null", f"train.iters={args.source_iters}",
        f"train.out={out}", f"train.device={args.device}", "train.resume=true", "train.progress=false",
        f"data.synthetic={{size: [{args.size[0]}, {args.size[1]}]}}", f"data.crop=[{args.size[0]}, {args.size[1]}]",
        *[e for e in args.extra if e.startswith("data.")]])
    return run_train_source(cfg)


def adapt(out: Path, recipe: str, extra: list[str], seed: int, source: Path, args) -> Path:
    if (out / "model.ckpt").exists():
        return out / "model.ckpt"
    cfg = load_config(AdaptConfig, file=args.adapt_config.format(recipe=recipe), overrides=[
        f"checkpoint={source}", f"train.out={out}", f"train.seed={seed}", f"train.iters={args.adapt_iters}",
        f"train.device={args.device}", "train.resume=true", "train.progress=false", "data.val=null",
        "data.val_extra=[]", f"data.cache_dir={args.out / 'cache'}",
        f"data.synthetic={{size: [{args.size[0]}, {args.size[1]}]}}", f"data.crop=[{args.size[0]}, {args.size[1]}]",
        *[e for e in args.extra if e.startswith("data.") or recipe == "diga_sf"], *extra])
    return run_adapt(cfg)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/bench_synthetic"))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--ablation-seeds", type=int, default=1)
    p.add_argument("--source-iters", type=int, default=1000)
    p.add_argument("--adapt-iters", type=int, default=400)
    p.add_argument("--source-ckpt", help="reuse this source model (e.g. runs/demo/source/model.ckpt)")
    p.add_argument("--oracle-ckpt", help="reuse this oracle (e.g. runs/demo/oracle/model.ckpt)")
    p.add_argument("--size", type=int, nargs=2, default=[128, 256], metavar=("H", "W"))
    p.add_argument("--val-length", type=int, default=200)
    p.add_argument("--device", default="auto")
    p.add_argument("--source-config", default="configs/source/synthetic_tiny.yaml")
    p.add_argument("--adapt-config", default="configs/adapt/{recipe}_synthetic.yaml")
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny sizes and schedules: a smoke test of the script")
    args = p.parse_args(argv)
    args.extra = []
    if args.quick:
        args.seeds, args.source_iters, args.adapt_iters, args.size, args.val_length = 1, 10, 2, [32, 64], 8
        args.extra = ["data.num_workers=0", "method.proto_init_images=8"]
    args.out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    t0 = time.perf_counter()

    synthetic = {"size": list(args.size), "length": args.val_length}
    loaders = {split: eval_loader(f"synthetic:{split}:val", resize=None, batch_size=16, num_workers=0,
                                  synthetic=synthetic) for split in ("target", "shift")}

    def score(ckpt: Path) -> dict[str, float]:
        model = load_model(ckpt)[0].to(device)
        return {split: evaluate_model(model, loader, device=device, eval_cfg=EvalConfig()).to_dict()["miou"]
                for split, loader in loaders.items()}

    results: dict[str, dict] = {}
    timings: dict[str, float] = {}
    given = {"source-only": args.source_ckpt, "oracle": args.oracle_ckpt}
    for name, split in (("source-only", "source"), ("oracle", "target")):
        t = time.perf_counter()
        ckpt = Path(given[name]) if given[name] else train_source(args.out / name, split, args)
        timings[name] = time.perf_counter() - t
        results[name] = {"seeds": [0], "runs": [score(ckpt)], "checkpoint": str(ckpt)}
    source_ckpt = Path(results["source-only"]["checkpoint"])

    variants = dict(VARIANTS)
    if not args.no_ablations:
        variants.update(ABLATIONS)
    for name, (recipe, extra) in variants.items():
        seeds = range(args.seeds if name in VARIANTS else args.ablation_seeds)
        runs, t = [], time.perf_counter()
        for seed in seeds:
            folder = args.out / (name.replace(", ", "__").replace(" ", "_").replace("%", "pct").replace("(", "")
                                 .replace(")", "")) / f"seed{seed}"
            ckpt = adapt(folder, recipe, extra, seed, source_ckpt, args)
            runs.append(score(ckpt))
            print(f"{name} seed {seed}: target {runs[-1]['target']:.2f} shift {runs[-1]['shift']:.2f}",
                  file=sys.stderr, flush=True)
        timings[name] = (time.perf_counter() - t) / max(1, len(runs))
        results[name] = {"seeds": list(seeds), "runs": runs, "recipe": recipe, "overrides": extra}

    src = results["source-only"]["runs"][0]["target"]
    orc = results["oracle"]["runs"][0]["target"]
    rows = []
    for name, r in results.items():
        tgt = [x["target"] for x in r["runs"]]
        sh = [x["shift"] for x in r["runs"]]
        mean, std = statistics.fmean(tgt), (statistics.stdev(tgt) if len(tgt) > 1 else 0.0)
        r.update(target_mean=mean, target_std=std, shift_mean=statistics.fmean(sh),
                 gap_closure=(mean - src) / (orc - src) if orc != src else float("nan"))
        rows.append((name, r))

    cmd = "python benchmarks/adapt_synthetic.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        f"Built-in benchmark, source -> target; model `tiny`; {args.size[1]}x{args.size[0]}; "
        f"{args.val_length} val images per domain; mIoU (%) over the classes present; adaptation "
        f"{args.adapt_iters} iterations (final checkpoint, no target labels); source model: "
        f"{results['source-only']['checkpoint']}; device {device}.",
        f"Reproduce: `{cmd.strip()}`",
        "",
        "| model | seeds | target mIoU (mean +- std) | gap closure | shift mIoU (held out) | wall time / run |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        n = len(r["runs"])
        gc = "-" if name in ("source-only", "oracle") else f"{100 * r['gap_closure']:.0f}%"
        lines.append(f"| {name} | {n} | {r['target_mean']:.1f} +- {r['target_std']:.1f} | {gc} | "
                     f"{r['shift_mean']:.1f} | {timings.get(name, 0):.0f} s |")
    table = "\n".join(lines)
    (args.out / "results.json").write_text(json.dumps({"results": results, "timings_s": timings,
                                                       "args": {k: str(v) for k, v in vars(args).items()}},
                                                      indent=2))
    (args.out / "results.md").write_text(table + "\n")
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
