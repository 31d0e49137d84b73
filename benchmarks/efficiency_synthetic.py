"""Efficiency table of the built-in benchmark: what each model of UniSFDA and DUDA costs and how accurate it is.

Rows (UniSFDA's efficiency table, on the synthetic benchmark's tiny models of three widths):

- the source models (width 32 = the demo's, width 16, width 8 = the small deployed architecture);
- UniSFDA stage 1: each auxiliary model adapted (``configs/adapt/unisfda_pipeline_synthetic.yaml``);
- the UniSFDA ensemble: the uncertainty-weighted fusion of the adapted stage-1 models that labels stage 2
  (MC-dropout certainty, as in the pipeline; its cost is that of every member plus the dropout passes);
- UniSFDA final: the width-8 model of stage 2;
- DUDA: its large EMA teacher (width 32) and its small student (width 8, started from the width-8 source
  model, the fair setting), ``configs/adapt/duda_synthetic.yaml``.

Every adaptation runs for each seed (``--seeds``); sources are trained once (seed 0) when missing. Columns:
parameters, GFLOPs at the evaluation size 128x256 (``torch.utils.flop_counter``, multiply-add = 2), median
latency at batch 1 on ``--device`` (``sfdaseg.evaluation.cost.model_cost``), target-val mIoU and held-out shift
mIoU (mean +- std over seeds). Then the two payoff checks of issue 5:

- distillation keeps the gain: ``(student - small source) / (teacher - small source)`` for DUDA (teacher = its
  large EMA teacher) and UniSFDA (teacher = the ensemble), per seed (goal >= 0.9);
- the UniSFDA final model against every stage-1 model it was distilled from (per seed).

    python benchmarks/efficiency_synthetic.py --out runs/efficiency --seeds 0 1 2 --device cpu \\
        --large runs/demo/source/model.ckpt

Finished runs are reused (a rerun only scores), so an interrupted benchmark continues where it stopped. Labels
are read by the scoring step only, after every run has finished.
"""

from __future__ import annotations

import logging
import argparse
import json
import os
import platform
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

logger = logging.getLogger("sfdaseg.bench")

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "configs/adapt/unisfda_pipeline_synthetic.yaml"
DUDA = ROOT / "configs/adapt/duda_synthetic.yaml"
SOURCE = ROOT / "configs/source/synthetic_tiny.yaml"
SIZE = (128, 256)  # the synthetic benchmark's image size: evaluation runs at it
SPLITS = {"target": "synthetic:target:val", "shift": "synthetic:shift:val"}
GOAL_KEEP = 0.9


def logger.info(msg: str) -> None:
    print(f"[efficiency] {msg}", file=sys.stderr, flush=True)


def source(out: Path, width: int, given: str | None, device: str) -> Path:
    if given:
        if not Path(given).is_file():
            sys.exit(f"error: source checkpoint {given} does not exist")
        return Path(given)
    ckpt = out / "sources" / f"w{width}" / "model.ckpt"
    if not ckpt.exists():
        logger.info(f"training the width-{width} source model into {ckpt.parent}")
        cfg = load_config(TrainSourceConfig, file=SOURCE, overrides=[
            f"model.options={{width: {width}}}", f"train.out={ckpt.parent}", f"train.device={device}",
            "train.resume=true", "train.progress=false", "data.val=null"])
        run_train_source(cfg)
    return ckpt


def unisfda(out: Path, seed: int, srcs: dict[int, Path], device: str) -> Path:
    run = out / f"seed{seed}" / "unisfda"
    if (run / "stage2" / "model.ckpt").exists():
        return run
    cfg = load_config(AdaptConfig, file=PIPELINE, overrides=[
        f"checkpoint={srcs[8]}", f"train.out={run}", f"train.seed={seed}", f"train.device={device}",
        "train.resume=true", "train.progress=false", "data.val=null", "data.val_extra=[]", "report=false",
        f"stages.aux=[{{name: tiny_w32, checkpoint: {srcs[32]}}}, {{name: tiny_w16, checkpoint: {srcs[16]}}}]"])
    t = time.perf_counter()
    run_pipeline(cfg)
    (run / "bench_time.json").write_text(json.dumps({"wall_s": time.perf_counter() - t}))
    return run


def duda(out: Path, seed: int, srcs: dict[int, Path], device: str) -> Path:
    run = out / f"seed{seed}" / "duda"
    if (run / "model.ckpt").exists() and (run / "large_teacher.ckpt").exists():
        return run
    cfg = load_config(AdaptConfig, file=DUDA, overrides=[
        f"checkpoint={srcs[32]}", f"method.student_checkpoint={srcs[8]}", f"train.out={run}",
        f"train.seed={seed}", f"train.device={device}", "train.resume=true", "train.progress=false",
        "data.val=null", "data.val_extra=[]", "report=false"])
    t = time.perf_counter()
    run_adapt(cfg)
    (run / "bench_time.json").write_text(json.dumps({"wall_s": time.perf_counter() - t}))
    return run


class Scorer:
    """mIoU on target val and shift val, cached in ``<name>.scores.json`` next to each model's files."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # 200 images per split, as `sfdaseg bench` scores (its source-only and adapted rows compare directly).
        synthetic = {"size": list(SIZE), "length": 200}
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


def ensemble(run: Path, mc_passes: int, measure: str, weighting: str) -> EnsembleLabeller:
    members = [load_model(run / f"stage1_{n}" / "model.ckpt")[0].eval() for n in ("tiny_w32", "tiny_w16")]
    return EnsembleLabeller(members, passes=mc_passes, measure=measure, weighting=weighting)


def mean_std(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.1f}"
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}"


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/efficiency")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--large", help="the width-32 source checkpoint (default: trained into OUT/sources/w32)")
    ap.add_argument("--mid", help="the width-16 source checkpoint (default: trained into OUT/sources/w16)")
    ap.add_argument("--small", help="the width-8 source checkpoint (default: trained into OUT/sources/w8)")
    ap.add_argument("--repeats", type=int, default=30, help="timed forward passes per latency")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    srcs = {32: source(out, 32, args.large, args.device), 16: source(out, 16, args.mid, args.device),
            8: source(out, 8, args.small, args.device)}
    runs = {s: (unisfda(out, s, srcs, args.device), duda(out, s, srcs, args.device)) for s in args.seeds}

    # ---- scoring (labels are read from here on only)
    device = torch.device(args.device)
    score = Scorer(device)
    pipe = load_config(AdaptConfig, file=PIPELINE).pipeline_config()
    ens_cfg = pipe.ensemble
    rows: dict[str, dict] = {}

    def add(name: str, kind: str, cache: Path, build, cost_key: str) -> None:
        r = rows.setdefault(name, {"kind": kind, "cost_key": cost_key, "target": [], "shift": []})
        s = score(cache, build)
        r["target"].append(s["target"])
        r["shift"].append(s["shift"])

    def ckpt_loader(path: Path):
        return lambda: load_model(path)[0]

    for w in (32, 16, 8):
        add(f"source, width {w}", f"tiny w{w}", srcs[w].with_suffix(".eff_scores.json"), ckpt_loader(srcs[w]),
            f"w{w}")
    for s, (uni, du) in runs.items():
        for n, w in (("tiny_w32", 32), ("tiny_w16", 16)):
            p = uni / f"stage1_{n}" / "model.ckpt"
            add(f"UniSFDA stage 1, width {w}", f"tiny w{w}", p.with_suffix(".eff_scores.json"), ckpt_loader(p),
                f"w{w}")
        add("UniSFDA ensemble (stage 1 fused)", "2 models + MC dropout", uni / "ensemble" / "eff_scores.json",
            lambda uni=uni: ensemble(uni, ens_cfg.mc_passes, ens_cfg.measure, ens_cfg.weighting), "ensemble")
        p = uni / "stage2" / "model.ckpt"
        add("UniSFDA final (stage 2), width 8", "tiny w8", p.with_suffix(".eff_scores.json"), ckpt_loader(p), "w8")
        p = du / "large_teacher.ckpt"
        add("DUDA large teacher, width 32", "tiny w32", p.with_suffix(".eff_scores.json"), ckpt_loader(p), "w32")
        p = du / "model.ckpt"
        add("DUDA small student, width 8", "tiny w8", p.with_suffix(".eff_scores.json"), ckpt_loader(p), "w8")

    # ---- cost: one measurement per architecture (weights do not change it)
    costs = {}
    first = runs[args.seeds[0]][0]
    builders = {"w32": ckpt_loader(srcs[32]), "w16": ckpt_loader(srcs[16]), "w8": ckpt_loader(srcs[8]),
                "ensemble": lambda: ensemble(first, ens_cfg.mc_passes, ens_cfg.measure, ens_cfg.weighting)}
    for key, build in builders.items():
        costs[key] = model_cost(build().to(device), size=SIZE, device=device, warmup=5, repeats=args.repeats)

    # ---- payoff
    small_src = rows["source, width 8"]["target"][0]
    seeds = list(runs)
    keep = {
        "DUDA (teacher: its large EMA teacher)": [
            (st - small_src) / (te - small_src) for st, te in zip(rows["DUDA small student, width 8"]["target"],
                                                                   rows["DUDA large teacher, width 32"]["target"])],
        "UniSFDA (teacher: the ensemble)": [
            (st - small_src) / (te - small_src) for st, te in zip(rows["UniSFDA final (stage 2), width 8"]["target"],
                                                                   rows["UniSFDA ensemble (stage 1 fused)"]["target"])],
    }
    final = rows["UniSFDA final (stage 2), width 8"]["target"]
    stage1 = [max(a, b) for a, b in zip(rows["UniSFDA stage 1, width 32"]["target"],
                                        rows["UniSFDA stage 1, width 16"]["target"])]

    # ---- report
    cmd = "python benchmarks/efficiency_synthetic.py " + " ".join(sys.argv[1:] if argv is None else argv)
    dev = costs["w8"]["device"]
    threads = costs["w8"]["threads"]
    lines = [
        "# Efficiency on the built-in benchmark (UniSFDA and DUDA)", "",
        f"Command: `{cmd}`", "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}; "
        f"latency on {dev}, {threads} threads, batch 1, median of {args.repeats} after 5 warm-up passes. "
        f"GFLOPs at {SIZE[0]}x{SIZE[1]} (the evaluation size), multiply-add = 2. mIoU: mean ± std over seeds "
        f"{seeds} (sources: one model each, trained once).", "",
        "| model | architecture | params | GFLOPs | latency (ms) | target mIoU | shift mIoU |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        c = costs[r["cost_key"]]
        lines.append(f"| {name} | {r['kind']} | {c['params'] / 1e3:.0f}k | {c['gflops']:.3f} | "
                     f"{c['latency_ms']:.2f} | {mean_std(r['target'])} | {mean_std(r['shift'])} |")
    lines += ["", f"## Does distillation keep the gain? (goal: >= {GOAL_KEEP:.0%} of the teacher's gain over the "
              f"width-8 source, {small_src:.1f})", "",
              "| distilled into width 8 | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
              "|---|" + "---|" * (len(seeds) + 1)]
    for name, ks in keep.items():
        lines.append(f"| {name} | " + " | ".join(f"{k:.0%}" for k in ks) + f" | {statistics.mean(ks):.0%} |")
    lines += ["", "## UniSFDA final against its best stage-1 model", "",
              "| | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |", "|---|" + "---|" * (len(seeds) + 1),
              "| final - best stage-1 (mIoU points) | " + " | ".join(f"{f - b:+.1f}" for f, b in zip(final, stage1))
              + f" | {statistics.mean(f - b for f, b in zip(final, stage1)):+.1f} |"]
    times = {f"seed{s}/{k}": json.loads((r / "bench_time.json").read_text())["wall_s"]
             for s, pair in runs.items() for k, r in zip(("unisfda", "duda"), pair) if (r / "bench_time.json").exists()}
    if times:
        lines += ["", "Wall time of each run (s, this machine): "
                  + ", ".join(f"{k} {v:.0f}" for k, v in times.items())]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"rows": rows, "costs": costs, "keep": keep,
                                                  "final_minus_best_stage1": [f - b for f, b in zip(final, stage1)],
                                                  "command": cmd}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
