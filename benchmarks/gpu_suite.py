"""Every GPU measurement of the project in one command of at most ~8 minutes (issue #18), markdown + JSON in $OUT.

A lent GPU machine is lent for about 15 minutes in all (start, idle and every try included), so everything it
should measure runs here, in one process, in priority order, under one time budget (``--budget-s``): a part that
would start after the budget is spent is written as "skipped (budget)" rather than run, and every finished part
is written at once, so a timeout still leaves every result measured so far.

Parts (each with the command that reproduces it alone):

1. ``env``: the machine, ``python3 -m pip show`` of torch, torchvision, transformers, onnxruntime, tensorboard,
   tqdm;
2. ``peak``: the bf16 matmul peak (TFLOP/s) of this GPU, measured (a chain of 8192^3 matmuls), the denominator
   of every MFU below;
3. ``step_<model>``: ``benchmarks/step_speed.py`` for selftrain, stvm, diga_sf (then unisfda, duda) on
   SegFormer-B5 and DeepLabV2-R101, batch 2, 512x512, bf16: median step, bare compute in the same run, overhead,
   images/s, data wait, peak memory, 3F+1F FLOPs and MFU;
4. ``switch_<model>``: the switch rows (channels-last, fused AdamW, torch.compile, SDPA, cudnn.benchmark) for
   selftrain, each with its measured effect;
5. ``profile``: ``torch.profiler`` over a few real steps of stvm on SegFormer-B5: GPU-busy fraction of the wall
   time (what is left is launch overhead, host work or a sync) and the top operators by GPU time;
6. ``mc_dropout``: ``benchmarks/mc_dropout_cost.py``, T = 1 / 4 / 8 / 16 at 512x1024 on both models;
7. ``eval``: ``sfdaseg evaluate`` on 500 images of 1024x512, whole image and sliding window, images/s.

The goals (issue #18) are checked in ``summary.md``: overhead <= 1.15 for selftrain, stvm, diga_sf; MC-dropout
T = 8 <= 1.5x one forward; stvm on SegFormer-B5 at >= 20 % MFU, i.e. a 40k-iteration run under 20 minutes
(DAFormer: about 16 h on an RTX 2080 Ti), with the arithmetic.

``--dry-run`` runs the same code on the CPU at a tiny size (tiny model, 32x64 crops, a few steps, 8 images): it is
in the default test suite, so that the GPU run cannot fail for a reason the CPU could have caught, and it
prints each part's wall time (the CPU times say nothing about GPU times; the GPU budget per part is in
``BUDGET_S``, to be checked against the first real run).

    python benchmarks/gpu_suite.py --out "$OUT"              # on the GPU machine
    python benchmarks/gpu_suite.py --out /tmp/gs --dry-run   # on a CPU, a minute
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the sibling benchmark scripts

import mc_dropout_cost  # noqa: E402
import step_speed  # noqa: E402

from sfdaseg.cli import main as cli_main  # noqa: E402
from sfdaseg.data.classes import CITYSCAPES19  # noqa: E402
from sfdaseg.engine.hooks import HookBase  # noqa: E402
from sfdaseg.log import setup_logging  # noqa: E402
from sfdaseg.models import build_model, save_model  # noqa: E402
from sfdaseg.storage import atomic_write_text  # noqa: E402

logger = logging.getLogger("sfdaseg.bench")

# Planned GPU seconds per part (an H100/H200, bf16): the order is the priority; the sum stays under 8 minutes.
BUDGET_S = {"env": 10, "peak": 10, "step_segformer_b5": 100, "step_deeplabv2_r101": 80, "profile": 25,
            "mc_dropout": 30, "eval": 70, "switch_segformer_b5": 90, "switch_deeplabv2_r101": 45}


def _sizes(dry: bool) -> dict[str, Any]:
    if dry:
        return {"models": ["tiny", "tiny"], "crop": [32, 64], "batch": 2, "amp": "fp32", "warmup": 1, "steps": 2,
                "workers": 0, "data_size": "64x32", "num_images": 4, "matmul": 256, "mc_size": [32, 64],
                "mc_passes": "1,2", "eval_images": 8, "eval_size": [32, 64], "eval_crop": [32, 32],
                "eval_stride": [16, 16], "recipes": "selftrain,stvm", "more_recipes": "", "device": "cpu",
                "switches": "channels_last,bf16", "profile_steps": 2}
    return {"models": ["segformer_b5", "deeplabv2_r101"], "crop": [512, 512], "batch": 2, "amp": "bf16",
            "warmup": 5, "steps": 20, "workers": 8, "data_size": "1024x512", "num_images": 32, "matmul": 8192,
            "mc_size": [512, 1024], "mc_passes": "1,4,8,16", "eval_images": 500, "eval_size": [512, 1024],
            "eval_crop": [512, 512], "eval_stride": [341, 341], "recipes": "selftrain,stvm,diga_sf",
            "more_recipes": "unisfda,duda", "device": "cuda", "switches": "channels_last,fused,compile,sdpa,cudnn_benchmark",
            "profile_steps": 5}


class Suite:
    """Runs the parts in order under the budget and writes ``OUT/<part>.md`` / ``.json`` as each one ends."""

    def __init__(self, out: Path, *, budget_s: float, dry: bool) -> None:
        self.out, self.budget_s, self.dry = out, budget_s, dry
        self.t0 = time.perf_counter()
        self.parts: dict[str, dict[str, Any]] = {}

    def run(self, name: str, fn: Callable[[], dict[str, Any]], command: str) -> None:
        spent = time.perf_counter() - self.t0
        planned = BUDGET_S.get(name, 30)
        if not self.dry and spent + planned > self.budget_s:
            self.parts[name] = {"status": f"skipped (budget: {spent:.0f} s spent, {planned} s planned, "
                                          f"{self.budget_s:.0f} s in all)", "command": command}
            logger.warning(f"gpu_suite: {name}: {self.parts[name]['status']}")
            self._write()
            return
        logger.info(f"gpu_suite: {name} ({spent:.0f} s spent)")
        t = time.perf_counter()
        try:
            result = fn()
            status = "ok"
        except Exception as e:  # noqa: BLE001 - one failing part must not lose the others
            result, status = {}, f"failed: {type(e).__name__}: {e}"
            logger.warning(f"gpu_suite: {name}: {status}")
        self.parts[name] = {"status": status, "wall_s": time.perf_counter() - t, "command": command, **result}
        self._write()

    def _write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "suite.json", json.dumps(self.parts, indent=1, default=str))
        atomic_write_text(self.out / "summary.md", summary(self.parts, dry=self.dry,
                                                          total_s=time.perf_counter() - self.t0))


def part_env(device: str) -> dict[str, Any]:
    pkgs = ["torch", "torchvision", "transformers", "onnxruntime", "tensorboard", "tqdm"]
    shown = subprocess.run([sys.executable, "-m", "pip", "show", *pkgs], capture_output=True, text=True).stdout
    versions = {}
    name = None
    for line in shown.splitlines():
        if line.startswith("Name: "):
            name = line.split(": ", 1)[1]
        elif line.startswith("Version: ") and name:
            versions[name] = line.split(": ", 1)[1]
    info = step_speed.machine_info(torch.device(device))
    return {"machine": info, "packages": versions}


def part_peak(n: int, device: str) -> dict[str, Any]:
    """bf16 (fp32 on a CPU) matmul TFLOP/s: the median of 10 timed chains of 10 ``n x n`` matmuls."""
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    sync = step_speed.sync_fn(dev)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        sync()
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        sync()
        times.append((time.perf_counter() - t) / 10)
    times.sort()
    return {"peak_tflops": 2 * n ** 3 / times[len(times) // 2] / 1e12, "matmul": n, "dtype": str(dtype)}


def part_step(model: str, s: dict[str, Any], out: Path, *, switches: bool, peak: float | None) -> dict[str, Any]:
    recipes = s["recipes"] if switches else ",".join(r for r in (s["recipes"], s["more_recipes"]) if r)
    if switches:
        recipes = "selftrain"
    argv = ["--model", model, "--recipes", recipes, "--batch", str(s["batch"]), "--crop", *map(str, s["crop"]),
            "--amp", s["amp"], "--device", s["device"], "--warmup", str(s["warmup"]), "--steps", str(s["steps"]),
            "--data-size", s["data_size"], "--num-images", str(s["num_images"]), "--workers", str(s["workers"]),
            "--json", str(out / f"step_{model}_{'switch' if switches else 'base'}.json"),
            "--md", str(out / f"step_{model}_{'switch' if switches else 'base'}.md")]
    if switches:
        names = [n for n in s["switches"].split(",") if n != "sdpa" or model.startswith("segformer")]
        argv += ["--switches", ",".join(names), "--switch-recipes", "selftrain"]
    if peak:
        argv += ["--peak-tflops", f"{peak:.1f}"]
    rc = step_speed.main(argv)
    rows = json.loads(Path(argv[argv.index("--json") + 1]).read_text())["rows"] if rc == 0 else []
    return {"rc": rc, "rows": rows, "argv": argv}


class _Profile(HookBase):
    """``torch.profiler`` from step ``start`` for ``steps`` steps (a trainer hook)."""

    def __init__(self, start: int, steps: int) -> None:
        self.start, self.stop, self.prof, self.wall = start, start + steps, None, 0.0

    def before_step(self, trainer) -> None:
        if trainer.step == self.start:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=acts)
            self.prof.__enter__()
            step_speed.sync_fn(trainer.device)()
            self._t = time.perf_counter()

    def after_step(self, trainer) -> None:
        if self.prof is not None and trainer.step == self.stop:
            step_speed.sync_fn(trainer.device)()
            self.wall = time.perf_counter() - self._t
            prof = self.prof
            self.close(trainer)
            self.events = prof.key_averages()  # read after the profiler stopped

    def close(self, trainer) -> None:  # also when the run stops with an error: a profiler left on crashes at exit
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.prof = None


def part_profile(model: str, s: dict[str, Any], out: Path) -> dict[str, Any]:
    from sfdaseg.config import AdaptConfig, TrainConfig
    from sfdaseg.data.transforms import collate
    from sfdaseg.engine.distributed import DistInfo
    from sfdaseg.engine.trainer import Trainer

    args = argparse.Namespace(model=model, method=[], resize=None, scale_range=[0.5, 2.0], crop=s["crop"],
                              workers=s["workers"], batch=s["batch"], workdir=out / "profile_work",
                              warmup=s["warmup"], steps=s["steps"])
    (args.workdir / "run").mkdir(parents=True, exist_ok=True)
    h, w = step_speed.parse_size(s["data_size"])
    data = step_speed.write_images(args.workdir / "images", num_images=s["num_images"], size=(h, w))
    device = torch.device(s["device"])
    spec = step_speed.RowSpec(recipe="stvm", amp=s["amp"])
    task, train_ds = step_speed.build_task(spec, args, device, data, args.workdir / "run")
    hook = _Profile(start=s["warmup"], steps=s["profile_steps"])
    train_cfg = TrainConfig(iters=s["warmup"] + s["profile_steps"], amp=s["amp"], device=s["device"],
                            out=str(args.workdir / "run"), progress=False, tensorboard=False, log_every=10 ** 9)
    trainer = Trainer(task, train_ds, train_cfg=train_cfg, optim_cfg=AdaptConfig().optim, batch_size=s["batch"],
                      num_workers=s["workers"], device=device, dist_info=DistInfo(), run_dir=args.workdir / "run",
                      save_model=lambda p, m: None, hooks=[hook], collate_fn=collate, checkpoints=False)
    trainer.train()
    events = hook.events
    gpu = device.type == "cuda"
    key = "self_device_time_total" if gpu else "self_cpu_time_total"
    total_us = sum(getattr(e, key, 0) for e in events)
    top = sorted(events, key=lambda e: getattr(e, key, 0), reverse=True)[:12]
    return {"model": model, "recipe": "stvm", "steps": s["profile_steps"], "wall_s": hook.wall,
            "busy_frac": (total_us / 1e6) / max(hook.wall, 1e-9),
            "clock": "GPU kernel time" if gpu else "CPU op time",
            "top": [{"op": e.key, "ms": getattr(e, key, 0) / 1e3, "calls": e.count} for e in top]}


def part_mc(s: dict[str, Any], out: Path) -> dict[str, Any]:
    models = ",".join(dict.fromkeys(s["models"]))
    argv = ["--models", models, "--size", *map(str, s["mc_size"]), "--passes", s["mc_passes"], "--device",
            s["device"], "--warmup", "2", "--repeats", "5" if not s["device"] == "cpu" else "2",
            "--out", str(out / "mc_dropout.md")]
    if s["amp"] == "bf16":
        argv += ["--amp", "bf16"]
    rc = mc_dropout_cost.main(argv)
    return {"rc": rc, "table": (out / "mc_dropout.md").read_text() if rc == 0 else "", "argv": argv}


def part_eval(model: str, s: dict[str, Any], out: Path) -> dict[str, Any]:
    from sfdaseg.data.synthetic import write_folder_dataset

    root = out / "eval_data"
    if not (root / ".complete").exists():
        write_folder_dataset(root, domain="target", split="val", length=s["eval_images"], size=tuple(s["eval_size"]))
        (root / ".complete").write_text("ok\n")
    ckpt = out / f"eval_{model}.ckpt"
    torch.manual_seed(0)
    save_model(ckpt, build_model(model, num_classes=19), classes=CITYSCAPES19)
    rows = {}
    for mode in ("whole", "slide"):
        argv = ["evaluate", "--checkpoint", str(ckpt), "--data", f"folder:{root}", "--device", s["device"],
                "cost=false", "num_workers=" + str(s["workers"]), "batch_size=4", f"eval.amp={s['amp']}",
                "--json", str(out / f"eval_{mode}.json")]
        if mode == "slide":
            argv += [f"eval.mode=slide", f"eval.crop=[{s['eval_crop'][0]}, {s['eval_crop'][1]}]",
                     f"eval.stride=[{s['eval_stride'][0]}, {s['eval_stride'][1]}]"]
        t = time.perf_counter()
        rc = cli_main(argv)
        wall = time.perf_counter() - t
        rows[mode] = {"rc": rc, "wall_s": wall, "images_per_s": s["eval_images"] / wall,
                      "command": "sfdaseg " + shlex.join(argv)}
    return {"model": model, "images": s["eval_images"], "size": s["eval_size"], "rows": rows}


def _goal(ok: bool | None, text: str) -> str:
    return f"- {'met' if ok else 'missed' if ok is not None else 'not measured'}: {text}"


def summary(parts: dict[str, dict[str, Any]], *, dry: bool, total_s: float) -> str:
    lines = [f"# GPU suite{' (dry run on the CPU: times say nothing about a GPU)' if dry else ''}", "",
             f"Total {total_s:.0f} s. Each part, its status, its wall time and the command that repeats it:", "",
             "| part | status | wall s | command |", "|---|---|---:|---|"]
    for name, p in parts.items():
        lines.append(f"| {name} | {p['status']} | {p.get('wall_s', float('nan')):.1f} | `{p['command']}` |")
    env = parts.get("env", {})
    if env.get("machine"):
        m = env["machine"]
        lines += ["", f"Machine: {m.get('gpu') or m.get('cpu')}; torch {m.get('torch')}, "
                      f"packages {json.dumps(env.get('packages', {}))}"]
    peak = parts.get("peak", {}).get("peak_tflops")
    if peak:
        lines += [f"Measured matmul peak: {peak:.1f} TFLOP/s ({parts['peak']['dtype']}, {parts['peak']['matmul']}^3)."]
    lines += ["", "## Goals", ""]
    rows = [r for k, p in parts.items() if k.startswith("step_") for r in p.get("rows", []) if "na" not in r]
    for recipe in ("selftrain", "stvm", "diga_sf"):
        base = [r for r in rows if r["recipe"] == recipe and r["config"] == "base"]
        for r in base:
            lines.append(_goal(r["overhead"] <= 1.15, f"{recipe} on {r['model']}: overhead {r['overhead']:.2f}x "
                                                     f"(goal <= 1.15; {r['step_ms']:.1f} ms step vs "
                                                     f"{r['bare_ms']:.1f} ms bare compute)"))
    stvm = [r for r in rows if r["recipe"] == "stvm" and r["config"] == "base" and r["model"] == "segformer_b5"]
    if stvm and stvm[0].get("mfu") is not None:
        r = stvm[0]
        proj_min = 40000 * r["step_ms"] / 1e3 / 60
        lines.append(_goal(r["mfu"] >= 0.20, f"stvm on SegFormer-B5: MFU {100 * r['mfu']:.1f}% = "
                                            f"{r['projected_flops'] / 1e9:.0f} GFLOP/step / {r['step_ms']:.1f} ms / "
                                            f"{peak:.0f} TFLOP/s (goal >= 20%)"))
        lines.append(_goal(proj_min < 20, f"40k iterations x {r['step_ms']:.1f} ms = {proj_min:.1f} min (goal < 20 "
                                          f"min; DAFormer ~16 h on an RTX 2080 Ti)"))
    else:
        lines.append(_goal(None, "stvm on SegFormer-B5 at >= 20% MFU (needs the GPU rows)"))
    mc = parts.get("mc_dropout", {})
    mc_rows = [ln for ln in mc.get("table", "").splitlines() if ln.startswith("| ") and ln.rstrip().endswith(
        ("| yes |", "| no |"))]
    for ln in mc_rows:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        lines.append(_goal(cells[-1] == "yes", f"MC-dropout T=8 on {cells[0]}: {cells[-2].split(' ')[0]} of one "
                                              f"forward (goal <= 1.5x)"))
    if not mc_rows:
        lines.append(_goal(None, "MC-dropout T=8 <= 1.5x one forward (needs T=8 in the run)"))
    if mc.get("table"):
        lines += ["", "## MC-dropout", "", mc["table"]]
    prof = parts.get("profile", {})
    if prof.get("top"):
        lines += ["", f"## Profile: stvm on {prof['model']}, {prof['steps']} steps, {prof['clock']} busy "
                      f"{100 * prof['busy_frac']:.0f}% of the wall time", "", "| op | ms | calls |", "|---|---:|---:|"]
        lines += [f"| {t['op']} | {t['ms']:.1f} | {t['calls']} |" for t in prof["top"]]
    ev = parts.get("eval", {})
    if ev.get("rows"):
        lines += ["", f"## Evaluation: {ev['images']} images of {ev['size'][1]}x{ev['size'][0]}, {ev['model']}", "",
                  "| mode | images/s | command |", "|---|---:|---|"]
        lines += [f"| {m} | {r['images_per_s']:.1f} | `{r['command']}` |" for m, r in ev["rows"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/gpu_suite")))
    p.add_argument("--dry-run", action="store_true", help="the same code on the CPU at a tiny size")
    p.add_argument("--budget-s", type=float, default=450.0, help="no part starts after this many seconds")
    args = p.parse_args(argv)
    s = _sizes(args.dry_run)
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device: run on the GPU machine, or use --dry-run on a CPU")
    out = args.out
    suite = Suite(out, budget_s=args.budget_s, dry=args.dry_run)
    me = f"python benchmarks/gpu_suite.py --out OUT{' --dry-run' if args.dry_run else ''}"
    suite.run("env", lambda: part_env(s["device"]), me)
    suite.run("peak", lambda: part_peak(s["matmul"], s["device"]), me)
    peak = suite.parts.get("peak", {}).get("peak_tflops")
    for model in dict.fromkeys(s["models"]):
        suite.run(f"step_{model}", lambda m=model: part_step(m, s, out, switches=False, peak=peak),
                  f"python benchmarks/step_speed.py --model {model} ...  (argv in suite.json)")
    suite.run("profile", lambda: part_profile(s["models"][0], s, out), me)
    suite.run("mc_dropout", lambda: part_mc(s, out), "python benchmarks/mc_dropout_cost.py ...  (argv in suite.json)")
    suite.run("eval", lambda: part_eval(s["models"][0], s, out), "sfdaseg evaluate ...  (argv in suite.json)")
    for model in dict.fromkeys(s["models"]):
        suite.run(f"switch_{model}", lambda m=model: part_step(m, s, out, switches=True, peak=peak),
                  f"python benchmarks/step_speed.py --model {model} --switches ...  (argv in suite.json)")
    failed = [k for k, v in suite.parts.items() if v["status"].startswith("failed")]
    print((out / "summary.md").read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
