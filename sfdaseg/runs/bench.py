"""``sfdaseg bench``: several recipes x seeds on one benchmark, one markdown + JSON table.

Protocol (the README's results come from this command):

- one source model (given, or trained on the labelled ``source`` data) is the fixed input of source-free
  adaptation; seeds vary the adaptation only;
- one target oracle (the same architecture trained on labelled target *training* data) gives the upper bound
  no recipe may use; gap closure = (adapted - source) / (oracle - source);
- every run adapts for a fixed schedule and the *final* checkpoint is scored: no label picks a checkpoint;
- every model is scored on ``val`` (target) and on the held-out ``val_extra`` domains, so overfitting the
  target style shows;
- each run keeps ``snapshots`` checkpoints with their label-free signals (``RUN/selection.jsonl``); bench then
  scores every snapshot with labels *after the fact* and reports how well each signal ranks them (Spearman),
  so a user knows which signal to trust when there are no labels.

Finished runs and scores are reused, so an interrupted bench continues where it stopped.
"""

from __future__ import annotations

import logging
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from sfdaseg.config import AdaptConfig, BenchConfig, EvalConfig, TrainSourceConfig, load_config, to_dict
from sfdaseg.models import load_model
from sfdaseg.engine.distributed import resolve_device
from sfdaseg.runs.adapt import run_adapt
from sfdaseg.runs.common import eval_loader, evaluate_model
from sfdaseg.runs.train_source import run_train_source
from sfdaseg.selection import SIGNAL_SIGN, SIGNALS, spearman

logger = logging.getLogger(__name__)

# recipe -> one row per removed or changed part: (label, overrides). Used with ``ablations=true``.
ABLATIONS: dict[str, list[tuple[str, list[str]]]] = {
    "selftrain": [
        ("confidence-ratio weight (recipe default)", ["method.policy=ratio"]),
        ("no style augmentation", ["method.style=none"]),
        ("no ClassMix", ["method.classmix=false"]),
    ],
    "stvm": [
        ("no reliability (plain CE)", ["method.reliability=false"]),
        ("uniform ClassMix (no MOCM)", ["method.mocm=false"]),
    ],
    "diga_sf": [
        ("no consensus (raw offline labels)", ["method.consensus=false"]),
        ("no distillation", ["method.distill_weight=0.0"]),
        ("no style augmentation", ["method.style=none"]),
    ],
    # Built up part by part (the paper's ablation order): knowledge transfer alone, + dual attention, + the
    # MaxSquare target loss; adding IPSM's patch adversary gives the full recipe's row. Last, the BN-mode choice.
    "sfda_liu": [
        ("BNS only (L_BNS + L_MAE, no target loss)", [
            "method.dad_weight=0.0", "method.dad_st_weight=0.0", "method.tar_weight=0.0", "method.adv_weight=0.0",
            "method.disc_weight=0.0"]),
        ("BNS + DAD (no target loss)", ["method.tar_weight=0.0", "method.adv_weight=0.0", "method.disc_weight=0.0"]),
        ("BNS + DAD + MaxSquare (no IPSM)", ["method.adv_weight=0.0", "method.disc_weight=0.0"]),
        ("joint BN (generated images in the target model's batch)", ["method.student_gen_bn=joint"]),
    ],
}


def slug(name: str) -> str:
    """A folder name for a table row."""
    for a, b in ((", ", "__"), (" ", "_"), ("%", "pct"), ("(", ""), (")", ""), ("/", "-"), ("=", "-")):
        name = name.replace(a, b)
    return name


def _rows(cfg: BenchConfig) -> list[tuple[str, str, list[str], int]]:
    """(row name, recipe, overrides, seeds) of every adapted row."""
    rows = [(r, r, [], cfg.seeds) for r in cfg.recipes]
    if cfg.ablations and cfg.ablation_seeds:
        for r in cfg.recipes:
            rows += [(f"{r}, {label}", r, list(o), cfg.ablation_seeds) for label, o in ABLATIONS.get(r, [])]
    rows += [(name, spec[0], list(spec[1:]), cfg.ablation_seeds or cfg.seeds) for name, spec in cfg.variants.items()]
    return rows


def _synthetic_overrides(cfg: BenchConfig, *, prefix: str) -> list[str]:
    if not cfg.synthetic:
        return []
    out = [f"{prefix}synthetic={json.dumps(cfg.synthetic)}"]
    size = cfg.synthetic.get("size")
    if size:  # the built-in benchmark trains on whole images (random scale, then a crop of the image size)
        out.append(f"{prefix}crop=[{size[0]}, {size[1]}]")
    return out


def _train_source(cfg: BenchConfig, out: Path, data: str) -> Path:
    if (out / "model.ckpt").exists():
        return out / "model.ckpt"
    tcfg = load_config(TrainSourceConfig, file=cfg.source_config or None, overrides=[
        f"data.train={data}", "data.val=null", f"train.iters={cfg.source_iters}", f"train.out={out}",
        f"train.device={cfg.device}", "train.resume=true", "train.progress=false",
        *_synthetic_overrides(cfg, prefix="data.")])
    return run_train_source(tcfg)


def _adapt(cfg: BenchConfig, out: Path, recipe: str, overrides: list[str], seed: int, source: Path) -> Path:
    if (out / "model.ckpt").exists():
        return out / "model.ckpt"
    base = cfg.adapt_config.format(recipe=recipe) if cfg.adapt_config else None
    if base and not Path(base).is_file():
        base = None  # no per-recipe file: the recipe's defaults
    monitor = ["monitor.every=-1"]
    if cfg.snapshots:
        monitor = [f"monitor.every={max(1, cfg.adapt_iters // cfg.snapshots)}", "monitor.keep_checkpoints=true"]
    acfg = load_config(AdaptConfig, file=base, overrides=[
        f"recipe={recipe}", f"checkpoint={source}", f"train.out={out}", f"train.seed={seed}",
        f"train.iters={cfg.adapt_iters}", f"train.device={cfg.device}", "train.resume=true", "train.progress=false",
        f"data.target={cfg.target}", "data.val=null", "data.val_extra=[]", f"data.cache_dir={Path(cfg.out) / 'cache'}",
        *_synthetic_overrides(cfg, prefix="data."), *monitor, *cfg.overrides,
        *cfg.recipe_overrides.get(recipe, []), *overrides])
    t = time.perf_counter()
    path = run_adapt(acfg)
    (out / "bench_time.json").write_text(json.dumps({"wall_s": time.perf_counter() - t}))
    return path


class Scorer:
    """Scores checkpoints on the labelled splits, caching the result next to each checkpoint."""

    def __init__(self, cfg: BenchConfig, device) -> None:
        synthetic = {**cfg.synthetic, "length": cfg.val_length} if cfg.synthetic else {}
        self.device = device
        self.loaders = {name: eval_loader(spec, resize=None, batch_size=16, num_workers=0, synthetic=synthetic)
                        for name, spec in [("target", cfg.val)] + [(s, s) for s in cfg.val_extra]}

    def __call__(self, ckpt: Path, *, splits: list[str] | None = None) -> dict[str, float]:
        cache = ckpt.with_suffix(".scores.json")
        scores = json.loads(cache.read_text()) if cache.exists() else {}
        todo = [s for s in (splits or list(self.loaders)) if s not in scores]
        if todo:
            model = load_model(ckpt)[0].to(self.device)
            for split in todo:
                scores[split] = evaluate_model(model, self.loaders[split], device=self.device,
                                               eval_cfg=EvalConfig()).to_dict()["miou"]
            cache.write_text(json.dumps(scores))
        return scores


def _signal_points(run_dir: Path, scorer: Scorer, source_score: float) -> list[dict[str, Any]]:
    """Every measured checkpoint of a run: its signals and (scored after the fact) its target mIoU."""
    path = run_dir / "selection.jsonl"
    if not path.exists():
        return []
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        by_step[rec["step"]] = rec  # a resumed run may have measured a step twice: the last one counts
    points = []
    for step, rec in sorted(by_step.items()):
        if step == 0:
            miou = source_score
        elif "checkpoint" in rec and Path(rec["checkpoint"]).exists():
            miou = scorer(Path(rec["checkpoint"]), splits=["target"])["target"]
        else:
            continue
        points.append({"step": step, "miou": miou, **{k: rec[k] for k in SIGNALS if k in rec}})
    return points


def signal_ranking(runs: list[list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """How well each signal ranks checkpoints by true target mIoU.

    ``pooled``: Spearman over all checkpoints of all runs (choosing among recipes and runs);
    ``within_run``: mean Spearman inside each run (choosing a checkpoint of one run); ``picked_miou``: mean
    target mIoU of the checkpoint each signal picks per run, beside ``final_miou`` (the last checkpoint) and
    ``best_miou`` (the best one, which only labels could find). Signals are oriented so that +1 is perfect.
    """
    out: dict[str, dict[str, float]] = {}
    pooled = [p for run in runs for p in run]
    runs = [r for r in runs if len(r) >= 2]
    for s in SIGNALS:
        sign = SIGNAL_SIGN[s]
        pts = [p for p in pooled if s in p]
        within = [spearman([sign * p[s] for p in r], [p["miou"] for p in r]) for r in runs]
        within = [w for w in within if not math.isnan(w)]
        picked = [max(r, key=lambda p: sign * p[s])["miou"] for r in runs]
        out[s] = {
            "pooled": spearman([sign * p[s] for p in pts], [p["miou"] for p in pts]),
            "within_run": statistics.fmean(within) if within else float("nan"),
            "picked_miou": statistics.fmean(picked) if picked else float("nan"),
        }
    if runs:
        final = statistics.fmean(r[-1]["miou"] for r in runs)
        best = statistics.fmean(max(p["miou"] for p in r) for r in runs)
        for s in out:
            out[s].update(final_miou=final, best_miou=best)
    return out


def _fmt(x: float, spec: str = ".2f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def run_bench(cfg: BenchConfig, *, command: str = "sfdaseg bench") -> Path:
    """Run (or resume) every row and write ``results.json`` and ``results.md`` into ``cfg.out``."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    t0 = time.perf_counter()
    scorer = Scorer(cfg, device)
    results: dict[str, dict[str, Any]] = {}

    src_t = time.perf_counter()
    source = Path(cfg.source_checkpoint) if cfg.source_checkpoint else _train_source(cfg, out / "source-only",
                                                                                      cfg.source)
    results["source-only"] = {"runs": [scorer(source)], "checkpoint": str(source), "seeds": [],
                              "wall_s": float("nan") if cfg.source_checkpoint else time.perf_counter() - src_t}
    if cfg.oracle_checkpoint or cfg.oracle:
        o_t = time.perf_counter()
        oracle = Path(cfg.oracle_checkpoint) if cfg.oracle_checkpoint else _train_source(cfg, out / "oracle",
                                                                                          cfg.oracle)
        results["oracle"] = {"runs": [scorer(oracle)], "checkpoint": str(oracle), "seeds": [],
                             "wall_s": float("nan") if cfg.oracle_checkpoint else time.perf_counter() - o_t}
    src_score = results["source-only"]["runs"][0]["target"]

    signal_runs = []
    for name, recipe, overrides, seeds in _rows(cfg):
        runs, walls = [], []
        for seed in range(seeds):
            folder = out / slug(name) / f"seed{seed}"
            ckpt = _adapt(cfg, folder, recipe, overrides, seed, source)
            runs.append(scorer(ckpt))
            timing = folder / "bench_time.json"
            walls.append(json.loads(timing.read_text())["wall_s"] if timing.exists() else float("nan"))
            points = _signal_points(folder, scorer, src_score)
            if points:
                signal_runs.append(points)
            logger.info(f"bench: {name} seed {seed}: " + ", ".join(f"{k} {v:.2f}" for k, v in runs[-1].items()))
        results[name] = {"recipe": recipe, "overrides": overrides, "seeds": list(range(seeds)), "runs": runs,
                         "wall_s": statistics.fmean(walls) if walls else float("nan")}

    orc = results.get("oracle", {}).get("runs", [{}])[0].get("target")
    for name, r in results.items():
        tgt = [x["target"] for x in r["runs"]]
        r["target_mean"] = statistics.fmean(tgt)
        r["target_std"] = statistics.stdev(tgt) if len(tgt) > 1 else 0.0
        r["extra_mean"] = {s: statistics.fmean(x[s] for x in r["runs"]) for s in cfg.val_extra}
        r["gap_closure"] = ((r["target_mean"] - src_score) / (orc - src_score)
                            if orc is not None and orc != src_score and name not in ("source-only", "oracle")
                            else None)
    ranking = signal_ranking(signal_runs) if signal_runs else {}

    extra_cols = "".join(f" {s} mIoU (held out) |" for s in cfg.val_extra)
    lines = [
        f"`{command}`",
        "",
        f"Source model: {results['source-only']['checkpoint']}; target {cfg.target}, scored on {cfg.val}; "
        f"{cfg.adapt_iters} adaptation iterations, final checkpoint (no labels pick it); mIoU in %; "
        f"device {device}.",
        "",
        f"| model | seeds | target mIoU (mean +- std) | gap closure |{extra_cols} wall time / run |",
        "|---|---:|---:|---:|" + "---:|" * len(cfg.val_extra) + "---:|",
    ]
    for name, r in results.items():
        gc = "-" if r["gap_closure"] is None else f"{100 * r['gap_closure']:.0f}%"
        extras = "".join(f" {r['extra_mean'][s]:.1f} |" for s in cfg.val_extra)
        lines.append(f"| {name} | {len(r['runs'])} | {r['target_mean']:.1f} +- {r['target_std']:.1f} | {gc} |"
                     f"{extras} {_fmt(r['wall_s'], '.0f')} s |")
    if ranking:
        n_ckpt = sum(len(r) for r in signal_runs)
        lines += [
            "",
            f"Label-free signals vs true target mIoU over {n_ckpt} checkpoints of {len(signal_runs)} runs "
            f"(Spearman, oriented so +1 is perfect; 'picked' = mean mIoU of the checkpoint each signal picks "
            f"per run, against the final checkpoint and the best one, which only labels could find):",
            "",
            "| signal | better when | pooled rank corr. | within-run rank corr. | picked mIoU | final mIoU | "
            "best mIoU |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for s, v in ranking.items():
            lines.append(f"| {s} | {'higher' if SIGNAL_SIGN[s] > 0 else 'lower'} | {_fmt(v['pooled'])} | "
                         f"{_fmt(v['within_run'])} | {_fmt(v['picked_miou'], '.1f')} | "
                         f"{_fmt(v.get('final_miou'), '.1f')} | {_fmt(v.get('best_miou'), '.1f')} |")
    table = "\n".join(lines) + "\n"
    (out / "results.json").write_text(json.dumps({
        "command": command, "config": to_dict(cfg), "results": results, "signal_ranking": ranking,
        "signal_points": signal_runs, "total_s": time.perf_counter() - t0}, indent=2))
    (out / "results.md").write_text(table)
    print(table, file=sys.stderr)
    return out / "results.md"
