"""Efficiency table of the built-in benchmark: what each model of UniSFDA and DUDA costs and how accurate it is.

Rows (UniSFDA's efficiency table), with ``tiny`` models of several widths: ``--aux-widths`` (default 32 16) are
UniSFDA's auxiliary models, ``--deployed-width`` (default 16, 129k parameters) is the efficient model that is
delivered, and the widest auxiliary model is DUDA's large network:

- the source models of each width (trained once, seed 0, with ``configs/source/synthetic_tiny.yaml``, when not
  given with ``--source W=PATH``);
- UniSFDA stage 1: each auxiliary model adapted (``configs/adapt/unisfda_pipeline_synthetic.yaml``);
- the UniSFDA ensemble: the uncertainty-weighted fusion of the adapted stage-1 models that labels stage 2
  (MC-dropout certainty, as in the pipeline; its cost is that of every member plus the dropout passes);
- UniSFDA final: the deployed-width model of stage 2;
- DUDA: its large EMA teacher and its small student (deployed width, started from the small source model, the
  fair setting), ``configs/adapt/duda_synthetic.yaml``.

Every adaptation runs for each seed (``--seeds``); ``--methods unisfda`` leaves DUDA out (its gain kept is also
measured on the bench runs by ``benchmarks/duda_gain_kept.py``). Columns: parameters, GFLOPs at the evaluation size 128x256
(``torch.utils.flop_counter``, multiply-add = 2), median latency at batch 1 on ``--device``, mIoU on the target
**test** split (the headline), target val and the held-out shift domain (mean +- std over seeds). Then the
payoff checks of issue 17:

- DUDA's small student keeps the gain: ``(student - small source) / (teacher - small source)`` per seed
  (goal >= 0.9), beside each model's gain over its own source;
- UniSFDA's final model against every stage-1 model it was distilled from (goal: above all of them).

    python benchmarks/efficiency_synthetic.py --out runs/efficiency --seeds 0 1 2 --device cpu \\
        --source 32=runs/demo/source/model.ckpt

Finished runs are reused (a rerun only scores), so an interrupted benchmark continues where it stopped. Labels
are read by the scoring step only, after every run has finished; no setting here was chosen on the test split.
"""

from __future__ import annotations

import logging
import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from sfdaseg.log import setup_logging
from sfdaseg.config import AdaptConfig, EvalConfig, TrainSourceConfig, load_config
from sfdaseg.models import load_model
from sfdaseg.evaluation.cost import model_cost
from sfdaseg.methods.unisfda import EnsembleLabeller
from sfdaseg.runs.adapt import run_adapt
from sfdaseg.runs.common import eval_loader, evaluate_model
from sfdaseg.runs.pipeline import run_pipeline
from sfdaseg.runs.train_source import run_train_source
from sfdaseg.storage import atomic_write_text

logger = logging.getLogger("sfdaseg.bench")

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "configs/adapt/unisfda_pipeline_synthetic.yaml"
DUDA = ROOT / "configs/adapt/duda_synthetic.yaml"
SOURCE = ROOT / "configs/source/synthetic_tiny.yaml"
SIZE = (128, 256)  # the synthetic benchmark's image size: evaluation runs at it
SPLITS = {"test": "synthetic:target:test", "val": "synthetic:target:val", "shift": "synthetic:shift:val"}
GOAL_KEEP = 0.9
NAMES = {"unisfda": "UniSFDA", "duda": "DUDA"}


def train_source(out: Path, width: int, device: str, iters: int | None) -> Path:
    ckpt = out / "sources" / f"w{width}" / "model.ckpt"
    if not ckpt.exists():
        logger.info(f"[efficiency] training the width-{width} source model into {ckpt.parent}")
        over = [f"model.options={{width: {width}}}", f"train.out={ckpt.parent}", f"train.device={device}",
                "train.resume=true", "train.progress=false", "data.val=null"]
        cfg = load_config(TrainSourceConfig, file=SOURCE, overrides=over + ([f"train.iters={iters}"] if iters else []))
        run_train_source(cfg)
    return ckpt


def _timed(run: Path, fn) -> None:
    t = time.perf_counter()
    fn()
    (run / "bench_time.json").write_text(json.dumps({"wall_s": time.perf_counter() - t}))


def pipeline_config(srcs: dict[int, Path], aux: list[int], deployed: int, extra: list[str]) -> AdaptConfig:
    members = ", ".join(f"{{name: tiny_w{w}, checkpoint: {srcs[w]}}}" for w in aux)
    return load_config(AdaptConfig, file=PIPELINE, overrides=[
        f"checkpoint={srcs[deployed]}", "data.val=null", "data.val_extra=[]", "report=false",
        f"stages.aux=[{members}]", *extra])


def unisfda(out: Path, seed: int, srcs: dict[int, Path], aux: list[int], deployed: int, device: str,
            extra: list[str]) -> Path:
    run = out / f"seed{seed}" / "unisfda"
    if (run / "stage2" / "model.ckpt").exists():
        return run
    cfg = pipeline_config(srcs, aux, deployed, [f"train.out={run}", f"train.seed={seed}", f"train.device={device}",
                                                "train.resume=true", "train.progress=false", *extra])
    _timed(run, lambda: run_pipeline(cfg))
    return run


def duda(out: Path, seed: int, srcs: dict[int, Path], large: int, small: int, device: str,
         extra: list[str]) -> Path:
    run = out / f"seed{seed}" / "duda"
    if (run / "model.ckpt").exists() and (run / "large_teacher.ckpt").exists():
        return run
    cfg = load_config(AdaptConfig, file=DUDA, overrides=[
        f"checkpoint={srcs[large]}", f"method.student_checkpoint={srcs[small]}",
        f"method.student_options={{width: {small}}}", f"train.out={run}", f"train.seed={seed}",
        f"train.device={device}", "train.resume=true", "train.progress=false", "data.val=null",
        "data.val_extra=[]", "report=false", *extra])
    _timed(run, lambda: run_adapt(cfg))
    return run


class Scorer:
    """mIoU on every split of ``SPLITS``, cached in ``<name>.scores.json`` next to each model's files."""

    def __init__(self, device: torch.device, length: int) -> None:
        self.device = device
        synthetic = {"size": list(SIZE), "length": length}  # as `sfdaseg bench` scores (200 images per split)
        self.loaders = {k: eval_loader(v, resize=None, batch_size=16, num_workers=0, synthetic=synthetic)
                        for k, v in SPLITS.items()}

    def __call__(self, cache: Path, build) -> dict[str, float]:
        scores = json.loads(cache.read_text()) if cache.exists() else {}
        if set(scores) != set(SPLITS):
            model = build().to(self.device).eval()
            scores = {k: evaluate_model(model, loader, device=self.device, eval_cfg=EvalConfig()).to_dict()["miou"]
                      for k, loader in self.loaders.items()}
            cache.write_text(json.dumps(scores))
        return scores


def ensemble(run: Path, aux: list[int], mc_passes: int, measure: str, weighting: str) -> EnsembleLabeller:
    members = [load_model(run / f"stage1_tiny_w{w}" / "model.ckpt")[0].eval() for w in aux]
    return EnsembleLabeller(members, passes=mc_passes, measure=measure, weighting=weighting)


def mean_std(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.1f}"
    return f"{statistics.mean(xs):.1f} +- {statistics.stdev(xs):.1f}"


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


def _source_arg(text: str) -> tuple[int, str]:
    width, _, path = text.partition("=")
    if not width.isdigit() or not path:
        raise argparse.ArgumentTypeError(f"expected WIDTH=PATH, got {text!r}")
    return int(width), path


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/efficiency")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--methods", nargs="+", choices=["unisfda", "duda"], default=["unisfda", "duda"],
                    help="which pipelines run and are reported")
    ap.add_argument("--aux-widths", type=int, nargs="+", default=[32, 16], help="UniSFDA's auxiliary models")
    ap.add_argument("--deployed-width", type=int, default=16, help="the efficient model both methods deliver")
    ap.add_argument("--source", type=_source_arg, action="append", default=[], metavar="W=PATH",
                    help="a given source checkpoint of width W (the others are trained into OUT/sources/wW)")
    ap.add_argument("--source-iters", type=int, default=None, help="iterations of a source training (default: "
                    "the config's)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="an override of every adaptation run (e.g. train.iters=40 for a smoke run)")
    ap.add_argument("--val-length", type=int, default=200, help="images per scored split")
    ap.add_argument("--repeats", type=int, default=30, help="timed forward passes per latency")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    aux, deployed = list(dict.fromkeys(args.aux_widths)), args.deployed_width
    large = max(aux)
    if deployed >= large:
        ap.error(f"--deployed-width {deployed} must be smaller than the widest auxiliary model ({large})")
    given = dict(args.source)
    for w, path in given.items():
        if not Path(path).is_file():
            ap.error(f"--source {w}={path}: no such file")
    widths = sorted(set(aux) | {deployed}, reverse=True)
    srcs = {w: Path(given[w]) if w in given else train_source(out, w, args.device, args.source_iters) for w in widths}
    with_uni, with_duda = "unisfda" in args.methods, "duda" in args.methods
    runs = {s: (unisfda(out, s, srcs, aux, deployed, args.device, args.override) if with_uni else None,
                duda(out, s, srcs, large, deployed, args.device, args.override) if with_duda else None)
            for s in args.seeds}

    # ---- scoring (labels are read from here on only)
    device = torch.device(args.device)
    score = Scorer(device, args.val_length)
    ens_cfg = pipeline_config(srcs, aux, deployed, args.override).pipeline_config().ensemble
    rows: dict[str, dict] = {}

    def add(name: str, kind: str, cache: Path, build, cost_key: str) -> None:
        r = rows.setdefault(name, {"kind": kind, "cost_key": cost_key, **{k: [] for k in SPLITS}})
        for k, v in score(cache, build).items():
            r[k].append(v)

    def ckpt_loader(path: Path):
        return lambda: load_model(path)[0]

    for w in widths:
        add(f"source, width {w}", f"tiny w{w}", srcs[w].with_suffix(".eff_scores.json"), ckpt_loader(srcs[w]), f"w{w}")
    for s, (uni, du) in runs.items():
        if uni is None:
            continue
        for w in aux:
            p = uni / f"stage1_tiny_w{w}" / "model.ckpt"
            add(f"UniSFDA stage 1, width {w}", f"tiny w{w}", p.with_suffix(".eff_scores.json"), ckpt_loader(p), f"w{w}")
        add("UniSFDA ensemble (stage 1 fused)", f"{len(aux)} models + MC dropout", uni / "ensemble" / "eff_scores.json",
            lambda uni=uni: ensemble(uni, aux, ens_cfg.mc_passes, ens_cfg.measure, ens_cfg.weighting), "ensemble")
        p = uni / "stage2" / "model.ckpt"
        add(f"UniSFDA final (stage 2), width {deployed}", f"tiny w{deployed}", p.with_suffix(".eff_scores.json"),
            ckpt_loader(p), f"w{deployed}")
    for s, (uni, du) in runs.items():
        if du is None:
            continue
        p = du / "large_teacher.ckpt"
        add(f"DUDA large teacher, width {large}", f"tiny w{large}", p.with_suffix(".eff_scores.json"), ckpt_loader(p),
            f"w{large}")
        p = du / "model.ckpt"
        add(f"DUDA small student, width {deployed}", f"tiny w{deployed}", p.with_suffix(".eff_scores.json"),
            ckpt_loader(p), f"w{deployed}")

    # ---- cost: one measurement per architecture (weights do not change it)
    first = runs[args.seeds[0]][0]
    builders = {f"w{w}": ckpt_loader(srcs[w]) for w in widths}
    if with_uni:
        builders["ensemble"] = lambda: ensemble(first, aux, ens_cfg.mc_passes, ens_cfg.measure, ens_cfg.weighting)
    costs = {k: model_cost(b().to(device), size=SIZE, device=device, warmup=5, repeats=args.repeats)
             for k, b in builders.items()}

    # ---- payoff, on the test split
    seeds = list(runs)
    small_src = rows[f"source, width {deployed}"]["test"][0]
    large_src = rows[f"source, width {large}"]["test"][0]
    keep, uni_keep, stage1, final = [], [], {}, []
    if with_duda:
        student = rows[f"DUDA small student, width {deployed}"]["test"]
        teacher = rows[f"DUDA large teacher, width {large}"]["test"]
        keep = [_ratio(st - small_src, te - small_src) for st, te in zip(student, teacher)]
    if with_uni:
        final = rows[f"UniSFDA final (stage 2), width {deployed}"]["test"]
        stage1 = {w: rows[f"UniSFDA stage 1, width {w}"]["test"] for w in aux}
        ens = rows["UniSFDA ensemble (stage 1 fused)"]["test"]
        uni_keep = [_ratio(f - small_src, e - small_src) for f, e in zip(final, ens)]

    # ---- report
    cmd = "python benchmarks/efficiency_synthetic.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    dev, threads = costs[f"w{deployed}"]["device"], costs[f"w{deployed}"]["threads"]
    lines = [
        f"# Efficiency on the built-in benchmark ({' and '.join(NAMES[m] for m in args.methods)})", "",
        f"Command: `{cmd}`", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}; "
        f"latency on {dev}, {threads} threads, batch 1, median of {args.repeats} after 5 warm-up passes. "
        f"GFLOPs at {SIZE[0]}x{SIZE[1]} (the evaluation size), multiply-add = 2. mIoU: mean +- std over seeds "
        f"{seeds} (sources: one model each); test = {SPLITS['test']} (the reported split), val = "
        f"{SPLITS['val']}, shift = {SPLITS['shift']} (held out).", "",
        "| model | architecture | params | GFLOPs | latency (ms) | test mIoU | val mIoU | shift mIoU |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        c = costs[r["cost_key"]]
        lines.append(f"| {name} | {r['kind']} | {c['params'] / 1e3:.0f}k | {c['gflops']:.3f} | "
                     f"{c['latency_ms']:.2f} | {mean_std(r['test'])} | {mean_std(r['val'])} | {mean_std(r['shift'])} |")
    seed_cols = " | ".join(f"seed {s}" for s in seeds)
    if with_duda:
        lines += [
            "", f"## DUDA: does the small student keep its teacher's gain? (goal >= {GOAL_KEEP:.0%}; test split)", "",
            f"Small source (width {deployed}) {small_src:.1f}, large source (width {large}) {large_src:.1f}.", "",
            f"| | {seed_cols} |", "|---|" + "---:|" * len(seeds),
            "| (student - small source) / (teacher - small source) | " + " | ".join(_pct(k) for k in keep) + " |",
            "| student gain over the small source (points) | "
            + " | ".join(f"{x - small_src:+.1f}" for x in student) + " |",
            "| teacher gain over the large source (points) | "
            + " | ".join(f"{x - large_src:+.1f}" for x in teacher) + " |"]
    if with_uni:
        lines += [
            "", "## UniSFDA: does the final model beat every stage-1 model it was distilled from? (test split)", "",
            f"| | {seed_cols} | mean |", "|---|" + "---:|" * (len(seeds) + 1)]
        for w, xs in stage1.items():
            d = [f - x for f, x in zip(final, xs)]
            lines.append(f"| final - stage 1 width {w} (points) | " + " | ".join(f"{x:+.1f}" for x in d)
                         + f" | {statistics.mean(d):+.1f} |")
        lines.append("| (final - small source) / (ensemble - small source) | "
                     + " | ".join(_pct(k) for k in uni_keep) + " | |")
    times = {f"seed{s}/{k}": json.loads((r / "bench_time.json").read_text())["wall_s"]
             for s, pair in runs.items() for k, r in zip(("unisfda", "duda"), pair)
             if r is not None and (r / "bench_time.json").exists()}
    if times:
        lines += ["", "Wall time of each run (s, this machine): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items())]
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "results.md", text)
    atomic_write_text(out / "results.json", json.dumps({
        "rows": rows, "costs": costs, "duda_keep": keep, "unisfda_keep": uni_keep, "command": cmd,
        "final_minus_stage1": {w: [f - x for f, x in zip(final, xs)] for w, xs in stage1.items()}}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
