"""``sfdaseg bench``: several recipes x seeds on one benchmark, one markdown + JSON table.

Protocol (the README's results come from this command):

- one source model (given, or trained on the labelled ``source`` data) is the fixed input of source-free
  adaptation; seeds vary the adaptation only;
- one target oracle (the same architecture trained on labelled target *training* data) gives the upper bound
  no recipe may use; gap closure = (adapted - source) / (oracle - source);
- every recipe runs at its shipped defaults (the benchmark only says what its data need: crop, batch size,
  schedule length); every run adapts for a fixed schedule and delivers its final model, or the collapse guard's
  last healthy snapshot: no label picks a checkpoint;
- every model is scored on ``test`` (the headline), on ``val`` (the split settings are chosen on) and on the
  held-out ``val_extra`` domains, so overfitting the target style shows; the table counts how often a recipe
  ended below the source model and how often the guard rolled back;
- each run keeps ``snapshots`` checkpoints with their label-free signals (``RUN/selection.jsonl``); bench then
  scores every snapshot with labels *after the fact* and reports how well each signal ranks them (Spearman),
  so a user knows which signal to trust when there are no labels.

Finished runs and scores are reused, so an interrupted bench continues where it stopped. Any folder benchmark
works (``--source``, ``--target``, ``--val``, ``--test``, ``oracle=``).
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

from sfdaseg.config import AdaptConfig, BenchConfig, ConfigError, EvalConfig, TrainSourceConfig, load_config, to_dict
from sfdaseg.models import load_model
from sfdaseg.engine.distributed import resolve_device
from sfdaseg.runs.adapt import run_adapt
from sfdaseg.runs.common import eval_loader, evaluate_model
from sfdaseg.runs.train_source import run_train_source
from sfdaseg.selection import SIGNAL_SIGN, SIGNALS, spearman
from sfdaseg.storage import atomic_write_text

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


def _is_synthetic(spec: str) -> bool:
    return spec.split(":", 1)[0].strip().lower() == "synthetic"


def _synthetic_overrides(cfg: BenchConfig, spec: str, *, prefix: str) -> list[str]:
    """The built-in benchmark's generator options (and its whole-image crop) for runs on a synthetic dataset."""
    if not cfg.synthetic or not _is_synthetic(spec):
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
        *_synthetic_overrides(cfg, data, prefix="data."), *cfg.source_overrides])
    return run_train_source(tcfg)


def _adapt(cfg: BenchConfig, out: Path, recipe: str, overrides: list[str], seed: int, source: Path) -> Path:
    if (out / "model.ckpt").exists():
        return out / "model.ckpt"
    base = cfg.adapt_config.format(recipe=recipe) if cfg.adapt_config else None
    if base and not Path(base).is_file():
        raise ConfigError(f"adapt_config: no such file: {base} (for recipe {recipe})")
    monitor = [f"monitor.every={max(1, cfg.adapt_iters // cfg.snapshots)}", "monitor.keep_checkpoints=true"] \
        if cfg.snapshots else []
    acfg = load_config(AdaptConfig, file=base, overrides=[
        f"recipe={recipe}", f"checkpoint={source}", f"train.out={out}", f"train.seed={seed}",
        f"train.iters={cfg.adapt_iters}", f"train.device={cfg.device}", "train.resume=true", "train.progress=false",
        f"data.target={cfg.target}", "data.val=null", "data.val_extra=[]", f"data.cache_dir={Path(cfg.out) / 'cache'}",
        *_synthetic_overrides(cfg, cfg.target, prefix="data."), *monitor, *cfg.overrides,
        *cfg.recipe_overrides.get(recipe, []), *overrides])
    t = time.perf_counter()
    path = run_adapt(acfg)
    (out / "bench_time.json").write_text(json.dumps({"wall_s": time.perf_counter() - t}))
    return path


def _guard(run_dir: Path) -> dict[str, Any]:
    """What the collapse guard did in a run (``RUN/metrics.json``): rolled back or not, alarms."""
    path = run_dir / "metrics.json"
    guard = json.loads(path.read_text()).get("guard") if path.exists() else None
    if not guard:
        return {"rolled_back": False, "alarms": 0, "delivered_step": None}
    return {"rolled_back": bool(guard.get("rolled_back")), "alarms": len(guard.get("alarms", [])),
            "delivered_step": guard.get("delivered_step")}


class Scorer:
    """Scores checkpoints on the labelled splits (``test``, ``val``, held-out domains), cached beside each one.

    The cache (``<checkpoint>.scores.json``) records what each score was measured on (the split's dataset
    spec, the generator options, the checkpoint's size and mtime) and a score is reused only when all of
    them match: one source checkpoint serves several benches whose "test" may be different splits (a tuning
    bench scores on ``target:val`` under that name), and a rerun may replace a checkpoint in place.
    """

    def __init__(self, cfg: BenchConfig, device) -> None:
        synthetic = {**cfg.synthetic, "length": cfg.val_length} if cfg.synthetic else {}
        self.device = device
        splits = [("test", cfg.test)] + ([("val", cfg.val)] if cfg.val else []) + [(v, v) for v in cfg.val_extra]
        self.loaders = {name: eval_loader(spec, resize=None, batch_size=16, num_workers=0, synthetic=synthetic)
                        for name, spec in splits}
        opts = json.dumps(synthetic, sort_keys=True) if any(_is_synthetic(spec) for _, spec in splits) else ""
        self.keys = {name: f"{spec} {opts}".strip() for name, spec in splits}

    def __call__(self, ckpt: Path, *, splits: list[str] | None = None) -> dict[str, float]:
        cache = ckpt.with_suffix(".scores.json")
        try:
            stored = json.loads(cache.read_text()) if cache.exists() else {}
        except ValueError:  # a torn or foreign file: score again
            stored = {}
        st = ckpt.stat()
        wanted = splits or list(self.loaders)
        key = {n: f"{self.keys[n]} @{st.st_size}:{st.st_mtime_ns}" for n in wanted}
        # Entries of another format (no "_keys") or of another split, generator or checkpoint are stale.
        keys = stored.get("_keys") if isinstance(stored.get("_keys"), dict) else {}
        scores = {n: stored[n] for n in wanted if n in stored and keys.get(n) == key[n]}
        todo = [n for n in wanted if n not in scores]
        if todo:
            model = load_model(ckpt)[0].to(self.device)
            for split in todo:
                scores[split] = evaluate_model(model, self.loaders[split], device=self.device,
                                               eval_cfg=EvalConfig()).to_dict()["miou"]
            # Valid entries of other splits stay; the new ones replace their stale namesakes.
            kept = {k: stored[k] for k in keys if k in stored and k not in todo}
            keys = {**{k: keys[k] for k in kept}, **{n: key[n] for n in todo}}
            atomic_write_text(cache, json.dumps({**kept, **scores, "_keys": keys}))
        return {n: scores[n] for n in wanted}


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
            miou = scorer(Path(rec["checkpoint"]), splits=["test"])["test"]
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
    results["source-only"] = {"runs": [scorer(source)], "checkpoint": str(source), "seeds": [], "guard": [],
                              "wall_s": float("nan") if cfg.source_checkpoint else time.perf_counter() - src_t}
    if cfg.oracle_checkpoint or cfg.oracle:
        o_t = time.perf_counter()
        oracle = Path(cfg.oracle_checkpoint) if cfg.oracle_checkpoint else _train_source(cfg, out / "oracle",
                                                                                          cfg.oracle)
        results["oracle"] = {"runs": [scorer(oracle)], "checkpoint": str(oracle), "seeds": [], "guard": [],
                             "wall_s": float("nan") if cfg.oracle_checkpoint else time.perf_counter() - o_t}
    src = results["source-only"]["runs"][0]

    signal_runs = []
    for name, recipe, overrides, seeds in _rows(cfg):
        runs, walls, guards = [], [], []
        for seed in range(seeds):
            folder = out / slug(name) / f"seed{seed}"
            ckpt = _adapt(cfg, folder, recipe, overrides, seed, source)
            runs.append(scorer(ckpt))
            guards.append(_guard(folder))
            timing = folder / "bench_time.json"
            walls.append(json.loads(timing.read_text())["wall_s"] if timing.exists() else float("nan"))
            points = _signal_points(folder, scorer, src["test"])
            if len(points) >= 2:  # one checkpoint ranks nothing
                signal_runs.append(points)
            logger.info(f"bench: {name} seed {seed}: " + ", ".join(f"{k} {v:.2f}" for k, v in runs[-1].items()))
        results[name] = {"recipe": recipe, "overrides": overrides, "seeds": list(range(seeds)), "runs": runs,
                         "guard": guards, "wall_s": statistics.fmean(walls) if walls else float("nan")}

    orc = results.get("oracle", {}).get("runs", [{}])[0].get("test")
    for name, r in results.items():
        test = [x["test"] for x in r["runs"]]
        r["test_mean"] = statistics.fmean(test)
        r["test_std"] = statistics.stdev(test) if len(test) > 1 else 0.0
        r["val_mean"] = statistics.fmean(x["val"] for x in r["runs"]) if cfg.val else None
        r["extra_mean"] = {s: statistics.fmean(x[s] for x in r["runs"]) for s in cfg.val_extra}
        adapted = name not in ("source-only", "oracle")
        r["gap_closure"] = ((r["test_mean"] - src["test"]) / (orc - src["test"])
                            if orc is not None and orc != src["test"] and adapted else None)
        r["below_source"] = sum(t < src["test"] for t in test) if adapted else None
        r["rolled_back"] = sum(g["rolled_back"] for g in r["guard"]) if adapted else None
    ranking = signal_ranking(signal_runs) if signal_runs else {}

    val_col = " val mIoU (for choosing) |" if cfg.val else ""
    extra_cols = "".join(f" {s} mIoU (held out) |" for s in cfg.val_extra)
    lines = [
        f"`{command}`",
        "",
        f"Source model: {results['source-only']['checkpoint']}; target {cfg.target}; reported on the test split "
        f"{cfg.test} (settings are chosen on {cfg.val or 'no split'}); every recipe at its shipped defaults, "
        f"{cfg.adapt_iters} adaptation iterations, the final checkpoint or the collapse guard's last healthy "
        f"snapshot (no label picks it); mIoU in %; device {device}.",
        "",
        f"| model | seeds | test mIoU (mean +- std) | gap closure | runs below source-only | guard rolled back |"
        f"{val_col}{extra_cols} wall time / run |",
        "|---|---:|---:|---:|---:|---:|" + ("---:|" if cfg.val else "") + "---:|" * len(cfg.val_extra) + "---:|",
    ]
    for name, r in results.items():
        gc = "-" if r["gap_closure"] is None else f"{100 * r['gap_closure']:.0f}%"
        n = len(r["runs"])
        below = "-" if r["below_source"] is None else f"{r['below_source']}/{n}"
        rolled = "-" if r["rolled_back"] is None else f"{r['rolled_back']}/{n}"
        val = f" {r['val_mean']:.1f} |" if cfg.val else ""
        extras = "".join(f" {r['extra_mean'][s]:.1f} |" for s in cfg.val_extra)
        lines.append(f"| {name} | {n} | {r['test_mean']:.1f} +- {r['test_std']:.1f} | {gc} | {below} | {rolled} |"
                     f"{val}{extras} {_fmt(r['wall_s'], '.0f')} s |")
    if ranking:
        n_ckpt = sum(len(r) for r in signal_runs)
        lines += [
            "",
            f"Label-free signals vs true test mIoU over {n_ckpt} checkpoints of {len(signal_runs)} runs "
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
    atomic_write_text(out / "results.json", json.dumps({
        "command": command, "config": to_dict(cfg), "results": results, "signal_ranking": ranking,
        "signal_points": signal_runs, "total_s": time.perf_counter() - t0}, indent=2))
    atomic_write_text(out / "results.md", table)
    print(table, file=sys.stderr)
    return out / "results.md"
