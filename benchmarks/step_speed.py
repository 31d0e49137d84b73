"""Speed of one adaptation step at realistic sizes, against the bare-compute floor (issue #9).

For each recipe (``--recipes``) at one model, batch, crop and precision, on one device, it measures:

- **step ms**: the median period of the real ``sfdaseg adapt`` loop. The script drives
  :class:`sfdaseg.engine.trainer.Trainer` itself, with the recipe's task built as ``run_adapt`` builds it
  (``RECIPES[name].build(AdaptContext(...), method_cfg)``, defaults of the recipe's config) and fed by the
  trainer's own DataLoader over a **folder dataset written to disk** (``--num-images`` procedural street scenes of
  ``--data-size``, PNG, decoded, rescaled, cropped and flipped in ``--workers`` worker processes, pinned on CUDA,
  persistent workers; for ``diga_sf`` the offline pseudo-labels are built first into a cache, as ``adapt`` does,
  and read with every sample). One iteration = data wait + ``task.training_step`` (under autocast) + backward +
  optimizer step + ``after_optimizer_step`` (the EMA update) + the trainer's bookkeeping. The clock is read by a
  trainer hook (:class:`StepTimer`) after each step, after ``torch.cuda.synchronize()``; the period between two
  such reads is one step. The first ``--warmup`` steps are not timed.
  What differs from ``sfdaseg adapt``: the model is randomly initialised (speed does not depend on the weights),
  nothing is evaluated, ``state.pt`` is not written, and the loop synchronises once per step (the host cannot
  queue the next step while the device finishes this one: conservative by at most the host time before a
  step's first kernel). ``--method RECIPE.KEY=VALUE`` changes a recipe hyper-parameter.
- **bare ms**: the floor, measured in the same process on the same modules, precision and optimizer right after
  the recipe run: the teacher forward(s) the recipe makes (same inputs, same count: 1 for selftrain and stvm, 2
  for diga_sf, whose offline labels are precomputed), the student forward(s) on the same input shape (diga_sf's
  student sees both views in one batch of ``2B``), a plain mean of the logits, backward, the optimizer step.
  Call shapes are recorded with forward hooks during one real step ("teacher" = every frozen module the task
  holds that was called; "student" = every trained ``SegmentationModel``). Other trainable modules (stvm's
  metric network), losses, augmentation, pseudo-labelling and the EMA update are what the overhead measures.
- **overhead** = step / bare; **img/s** = batch / step; **data wait**: the time the trainer waits for a batch
  (decoding behind it is hidden by the workers), mean ms per timed step and % of the summed step time;
- **peak mem**: ``torch.cuda.max_memory_allocated`` over the run (CUDA); on the CPU the main process's peak RSS
  so far (``resource.getrusage``; monotonic over the rows, DataLoader workers not included);
- **FLOPs**: one extra real step (not timed) runs under ``torch.utils.flop_counter.FlopCounterMode``: the
  counted total (forward + backward + everything else that the counter knows), and the convention of
  BENCHMARKS.md, ``3 x forward FLOPs of the trained modules + 1 x forward FLOPs of the frozen ones``, with each
  module call's forward FLOPs read from the same counter. TFLOP/s and MFU use the 3F+1F count (the counted one
  inflates ``convolution_backward``); MFU needs ``--peak-tflops`` (e.g. 790 for bf16 on an H100, measured here).
  On the CPU, SDPA attention kernels are not known to the counter (SegFormer counts are low there).

Switch rows (``--switches``, measured for ``--switch-recipes``, default the first recipe): the base config with
one option changed, with its speed-up over the base row: ``bf16`` (the other precision: bf16 when the base is
fp32, fp32 otherwise), ``channels_last`` (``train.channels_last``), ``fused`` (``optim.fused``, CUDA only),
``compile`` (``train.compile``: the trainer compiles the trainable modules, not the teacher), ``sdpa``
(SegFormer only: transformers already uses SDPA attention by default, so the row measures *eager* attention,
i.e. what SDPA saves), ``cudnn_benchmark`` (``torch.backends.cudnn.benchmark``, CUDA only; not a config
option). A last row combines every switch that was faster than the base by more than 2 %. Switches that
cannot run on the device are printed as ``n/a (...)`` rows. FLOPs of switch rows are those of the base row.

    python benchmarks/step_speed.py --model tiny --batch 4 --crop 128 256 --device cpu      # CPU, small
    python benchmarks/step_speed.py --model segformer_b5 --batch 2 --crop 512 512 --amp bf16 \\
        --peak-tflops 790 --switches channels_last,fused,compile,sdpa --json b5.json             # one GPU

A 40k-iteration projection (``--project-iters``) is printed for every base row. Prints a markdown table last;
``--json PATH`` and ``--md PATH`` write the results.
"""

from __future__ import annotations

import logging
import argparse
import gc
import json
import math
import os
import platform
import resource
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from sfdaseg.amp import AMP_DTYPES
from sfdaseg.config import (AdaptConfig, AdaptDataConfig, ConfigError, OptimConfig, TrainConfig, from_dict, nest,
                            parse_override)
from sfdaseg.data.classes import CITYSCAPES19
from sfdaseg.data.transforms import collate
from sfdaseg.engine.distributed import DistInfo, resolve_device
from sfdaseg.engine.hooks import HookBase
from sfdaseg.engine.trainer import Trainer
from sfdaseg.log import setup_logging
from sfdaseg.methods import RECIPES
from sfdaseg.methods.common import AdaptContext
from sfdaseg.models import MODELS, SegmentationModel, build_model
from sfdaseg.runs.adapt import target_datasets

logger = logging.getLogger("sfdaseg.bench")

SWITCHES = ("bf16", "channels_last", "fused", "compile", "sdpa", "cudnn_benchmark")
CUDA_ONLY = ("fused", "cudnn_benchmark")
COLUMNS = ("recipe", "config", "model", "batch", "crop", "amp", "step ms (median)", "bare ms", "overhead", "img/s",
           "data wait ms (%)", "peak mem", "GFLOP/step (counted)", "GFLOP/step (3F+1F)", "TFLOP/s (3F+1F)", "MFU",
           "vs base")
COMBINE_MIN_GAIN = 1.02  # a switch joins the combined row when it made the step at least 2 % faster


# ------------------------------------------------------------------------------------------------ set-up


@dataclass(frozen=True)
class RowSpec:
    """One measured configuration: the base options plus at most the switches named in ``label``."""

    recipe: str
    label: str = "base"
    amp: str = "fp32"
    channels_last: bool = False
    fused: bool = False
    compile: bool = False
    eager_attention: bool = False
    cudnn_benchmark: bool = False


def parse_size(text: str) -> tuple[int, int]:
    """``"1280x720"`` (width x height, as image sizes are usually written) -> ``(H, W)``."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--data-size: expected WIDTHxHEIGHT, e.g. 1280x720, got {text!r}") from None
    if w < 8 or h < 8:
        raise argparse.ArgumentTypeError(f"--data-size: expected at least 8x8, got {text!r}")
    return h, w


def parse_list(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if items == ["all"]:
        return list(allowed)
    if items == ["none"]:
        return []
    bad = [s for s in items if s not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"{what}: unknown {', '.join(bad)}; choices: {', '.join(allowed)}")
    return items


def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torchvision
    import transformers

    return {
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__, "torchvision": torchvision.__version__, "transformers": transformers.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None, "python": platform.python_version(),
        # Shared machines: the 1-minute load average says how much else ran beside the measurement.
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def write_images(root: Path, *, num_images: int, size: tuple[int, int]) -> Path:
    """Procedural street scenes in the folder-dataset layout (PNG), reused when already complete."""
    from sfdaseg.data.synthetic import write_folder_dataset

    done = root / ".complete"
    if not done.exists():
        logger.info(f"writing {num_images} images of {size[1]}x{size[0]} to {root}")
        write_folder_dataset(root, domain="target", split="train", length=num_images, size=size)
        done.write_text("ok\n")
    return root


def sync_fn(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def peak_memory(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device)), "cuda max allocated"
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024.0, "RSS peak, main process"


# ------------------------------------------------------------------------------------------------ instrumentation


class StepTimer(HookBase):
    """A trainer hook: a clock read after each optimizer step, the data wait of each step, one FLOP-counted step.

    ``ends[i]``: ``perf_counter()`` after step ``i`` (its EMA update included) and a device synchronisation;
    ``waits[i]``: the seconds step ``i`` waited for its batch. Step ``count_step`` runs under ``FlopCounterMode``
    (from ``before_step`` to ``after_step``), and forward hooks on every trainable module and every frozen
    module the task holds (the EMA teacher, a frozen source model) record each top-level call: role (the
    trainer's module name or the task's attribute name), input shape, keyword arguments and forward FLOPs.
    """

    def __init__(self, *, sync: Callable[[], None], count_step: int | None, peak_step: int,
                 device: torch.device) -> None:
        self.sync, self.count_step, self.peak_step, self.device = sync, count_step, peak_step, device
        self.ends: dict[int, float] = {}
        self.waits: dict[int, float] = {}
        self.peak: tuple[float, str] | None = None
        self.roles: dict[str, nn.Module] = {}
        self.trained: set[str] = set()
        self.calls: list[dict[str, Any]] = []
        self.counted_flops: int | None = None
        self._fc = None
        self._handles: list[Any] = []
        self._stack: list[tuple[str, int, tuple[int, ...], dict] | None] = []

    def before_train(self, trainer: Trainer) -> None:
        self.roles = {**frozen_modules(trainer.task, trainer), **trainer.modules}
        self.trained = set(trainer.modules)

    def before_step(self, trainer: Trainer) -> None:
        if trainer.step == self.count_step:
            self._start_count()

    def after_step(self, trainer: Trainer) -> None:
        step = trainer.step - 1  # the step that just ran
        if step == self.count_step:
            self.stop_count()
            return
        self.sync()
        self.ends[step] = time.perf_counter()
        self.waits[step] = trainer.last_data_wait
        if step == self.peak_step:
            self.peak = peak_memory(self.device)

    def close(self, trainer: Trainer) -> None:
        self.stop_count()

    # -- FLOPs and call shapes

    def _start_count(self) -> None:
        from torch.utils.flop_counter import FlopCounterMode

        self._fc = FlopCounterMode(display=False)
        self._fc.__enter__()
        for role, module in self.roles.items():
            self._handles.append(module.register_forward_pre_hook(partial(self._pre, role), with_kwargs=True))
            self._handles.append(module.register_forward_hook(partial(self._post, role), with_kwargs=True))

    def _pre(self, role: str, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._stack:  # a hooked module called inside another one (e.g. a frozen model held twice): count once
            self._stack.append(None)
            return
        x = args[0] if args else next(iter(kwargs.values()))
        self._stack.append((role, self._fc.get_total_flops(), tuple(x.shape), dict(kwargs)))

    def _post(self, role: str, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        entry = self._stack.pop()
        if entry is None:
            return
        role, before, shape, kw = entry
        self.calls.append({"role": role, "shape": shape, "kwargs": {k: v for k, v in kw.items()
                                                                    if isinstance(v, (bool, int, float))},
                           "grad": torch.is_grad_enabled(), "trained": role in self.trained,
                           "forward_flops": self._fc.get_total_flops() - before})

    def stop_count(self) -> None:
        if self._fc is None:
            return
        for h in self._handles:
            h.remove()
        self._handles = []
        self.counted_flops = self._fc.get_total_flops()
        self._fc.__exit__(None, None, None)
        self._fc = None


# ------------------------------------------------------------------------------------------------ one row


def build_task(spec: RowSpec, args, device: torch.device, data_root: Path, run_dir: Path):
    """Model, datasets and task exactly as ``run_adapt`` makes them (random weights instead of a checkpoint)."""
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=CITYSCAPES19.num_classes).to(device)
    if spec.eager_attention:
        backbone = model.backbone
        if hasattr(backbone, "set_attn_implementation"):
            backbone.set_attn_implementation("eager")
        else:
            backbone.config._attn_implementation = "eager"
    recipe = RECIPES[spec.recipe]
    overrides = {k.split(".", 1)[1]: v for k, v in args.method if k.split(".", 1)[0] == spec.recipe}
    method_cfg = from_dict(recipe.config_cls, nest(overrides), source="--method", prefix="method.")  # validated
    data_cfg = AdaptDataConfig(target=f"folder:{data_root}", resize=tuple(args.resize) if args.resize else None,
                               scale_range=tuple(args.scale_range), crop=tuple(args.crop), hflip=True,
                               num_workers=args.workers, val_batch_size=args.batch,
                               cache_dir=str(args.workdir / "pseudo_labels"))
    train_ds, target_ctx = target_datasets(model, method_cfg.offline_labels(), data_cfg, device=device,
                                           amp=spec.amp, progress=False)
    torch.manual_seed(0)
    ctx = AdaptContext(model=model, classes=CITYSCAPES19, device=device, export="teacher", target=target_ctx,
                       run_dir=run_dir, iters=args.warmup + args.steps + 1)
    return recipe.build(ctx, method_cfg), train_ds


def frozen_modules(task: Any, trainer: Trainer) -> dict[str, nn.Module]:
    """The task's modules that the optimizer does not update (EMA teacher, frozen source model), by attribute."""
    trained = {id(m) for m in trainer.modules.values()} | {id(m) for m in trainer.wrapped.values()}
    trained |= {id(sub) for m in trainer.modules.values() for sub in m.modules()}
    return {name: m for name, m in vars(task).items()
            if isinstance(m, nn.Module) and id(m) not in trained and any(True for _ in m.parameters())}


def bare_compute(task: Any, trainer: Trainer, calls: list[dict], *, spec: RowSpec, device: torch.device,
                 warmup: int, steps: int) -> list[float]:
    """Frozen-model (teacher) forward(s) + student forward/backward + optimizer step on the recorded shapes (ms)."""
    frozen = frozen_modules(task, trainer)
    # The trained segmentation models (the student; DUDA's small student too), as the step calls them (compiled
    # when the row compiles). Other trained modules (metric network, generator, discriminator) are overhead.
    students = {k: trainer.wrapped.get(k, m) for k, m in trainer.modules.items() if isinstance(m, SegmentationModel)}
    amp_dtype = AMP_DTYPES[spec.amp]
    fmt = torch.channels_last if spec.channels_last else torch.contiguous_format

    def make(shape):
        return torch.rand(shape, device=device).contiguous(memory_format=fmt)

    t_calls = [(frozen[c["role"]], make(c["shape"]), c["kwargs"]) for c in calls if c["role"] in frozen]
    s_calls = [(students[c["role"]], make(c["shape"]), c["kwargs"]) for c in calls if c["role"] in students]
    if not s_calls:
        raise RuntimeError(f"{spec.recipe}: no student call was recorded during the counted step")
    optimizer = trainer.optimizer
    scaler = torch.amp.GradScaler(device.type, enabled=spec.amp == "fp16")
    sync = sync_fn(device)

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    def one() -> None:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            with torch.no_grad():
                for teacher, x, kw in t_calls:
                    teacher(x, **kw)
            loss = sum(first(student(x, **kw)).float().mean() for student, x, kw in s_calls)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        one()
    times = []
    sync()
    for _ in range(steps):
        t0 = time.perf_counter()
        one()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure(spec: RowSpec, args, device: torch.device, data_root: Path, *, count: bool,
            calls: list[dict] | None) -> dict[str, Any]:
    """Run one configuration: ``warmup + steps`` timed trainer steps (+1 FLOP-counted step), then the bare loop."""
    saved_cudnn = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = spec.cudnn_benchmark or saved_cudnn
    try:
        return _measure(spec, args, device, data_root, count=count, calls=calls)
    finally:
        torch.backends.cudnn.benchmark = saved_cudnn
        if spec.compile:
            from torch import _dynamo

            _dynamo.reset()  # the next row builds new modules: drop the compiled graphs of this one


def _measure(spec: RowSpec, args, device: torch.device, data_root: Path, *, count: bool,
             calls: list[dict] | None) -> dict[str, Any]:
    logger.info(f"[{spec.recipe} / {spec.label}] building")
    run_dir = Path(tempfile.mkdtemp(prefix="run_", dir=args.workdir))
    task, train_ds = build_task(spec, args, device, data_root, run_dir)
    if device.type == "cuda":  # the peak of training (weights included), not of the offline-label pass
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    iters = args.warmup + args.steps + (1 if count else 0)
    last_timed = args.warmup + args.steps - 1
    timer = StepTimer(sync=sync_fn(device), count_step=last_timed + 1 if count else None, peak_step=last_timed,
                      device=device)
    train_cfg = TrainConfig(iters=iters, amp=spec.amp, channels_last=spec.channels_last, compile=spec.compile,
                            seed=0, device=str(device), log_every=10**9, ckpt_every=10**9, out=str(run_dir),
                            progress=False, tensorboard=False)
    optim_cfg: OptimConfig = replace(AdaptConfig().optim, name=args.optim, fused=spec.fused)
    # The real trainer; the step timer is a hook, and a benchmark does not resume (no state.pt, which would cost
    # seconds per row).
    trainer = Trainer(task, train_ds, train_cfg=train_cfg, optim_cfg=optim_cfg, batch_size=args.batch,
                      num_workers=args.workers, device=device, dist_info=DistInfo(), run_dir=run_dir,
                      save_model=lambda path, model: None, hooks=[timer], config={}, collate_fn=collate,
                      checkpoints=False)
    logger.info(f"[{spec.recipe} / {spec.label}] {args.warmup} warm-up + {args.steps} timed steps")
    trainer.train()
    waits_ms = [timer.waits[i] * 1e3 for i in range(args.warmup, args.warmup + args.steps)]
    gc.collect()  # the loader's workers shut down before the bare loop runs
    calls = timer.calls if count else calls
    logger.info(f"[{spec.recipe} / {spec.label}] bare compute")
    bare = bare_compute(task, trainer, calls or [], spec=spec, device=device, warmup=args.warmup, steps=args.steps)

    steps_ms = [(timer.ends[i] - timer.ends[i - 1]) * 1e3 for i in range(args.warmup, args.warmup + args.steps)]
    step = statistics.median(steps_ms)
    bare_ms = statistics.median(bare)
    mem, mem_kind = timer.peak
    row: dict[str, Any] = {
        "recipe": spec.recipe, "config": spec.label, "model": args.model, "batch": args.batch,
        "crop": list(args.crop), "amp": spec.amp, "device": str(device),
        "step_ms": step, "step_ms_all": steps_ms, "bare_ms": bare_ms, "bare_ms_all": bare,
        "overhead": step / bare_ms, "img_s": args.batch / (step / 1e3),
        "data_wait_ms": statistics.fmean(waits_ms), "data_wait_pct": 100.0 * sum(waits_ms) / sum(steps_ms),
        "peak_mem_bytes": mem, "peak_mem_kind": mem_kind,
        "switches": {k: getattr(spec, k) for k in ("channels_last", "fused", "compile", "eager_attention",
                                                    "cudnn_benchmark")},
    }
    if count:
        proj = sum((3 if c["trained"] else 1) * c["forward_flops"] for c in timer.calls)
        row.update(counted_flops=float(timer.counted_flops), projected_flops=float(proj),
                   calls=[{k: (list(v) if k == "shape" else v) for k, v in c.items()} for c in timer.calls])
    row["_calls"] = calls

    del trainer, timer, task, train_ds
    gc.collect()
    logger.info(f"[{spec.recipe} / {spec.label}] step {step:.1f} ms, bare {bare_ms:.1f} ms")
    return row


def na_row(spec: RowSpec, args, reason: str) -> dict[str, Any]:
    return {"recipe": spec.recipe, "config": spec.label, "model": args.model, "batch": args.batch,
            "crop": list(args.crop), "amp": spec.amp, "na": reason}


def switch_spec(name: str, base: RowSpec, args, device: torch.device) -> RowSpec | str:
    """The base spec with switch ``name`` applied, or the reason it cannot run here."""
    if name in CUDA_ONLY and device.type != "cuda":
        return "n/a (CUDA only)"
    if name == "bf16":
        amp = "bf16" if base.amp != "bf16" else "fp32"
        return replace(base, amp=amp, label=f"{amp} (vs {base.amp})")
    if name == "channels_last":
        return replace(base, channels_last=True, label="+channels_last")
    if name == "fused":
        return replace(base, fused=True, label="+fused optimizer")
    if name == "compile":
        return replace(base, compile=True, label="+compile (trainable modules)")
    if name == "cudnn_benchmark":
        return replace(base, cudnn_benchmark=True, label="+cudnn.benchmark (not a config option)")
    if name == "sdpa":
        if not args.model.startswith("segformer"):
            return "n/a (SegFormer only)"
        from transformers import SegformerModel

        if not getattr(SegformerModel, "_supports_sdpa", False):
            return "n/a (this transformers' SegFormer has eager attention only)"
        return replace(base, eager_attention=True, label="eager attention (vs SDPA, the default)")
    raise ValueError(f"unknown switch {name!r}")


# ------------------------------------------------------------------------------------------------ report


def _sig(x: float, digits: int = 3) -> str:
    """``x`` with ``digits`` significant digits in fixed notation (small rates stay readable: 0.0123)."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    return f"{x:.{max(0, digits - 1 - math.floor(math.log10(abs(x))))}f}"


def _fmt_mem(row: dict) -> str:
    gib = row["peak_mem_bytes"] / 2**30
    kind = "" if row["peak_mem_kind"].startswith("cuda") else " RSS"
    return f"{gib:.2f} GiB{kind}"


def format_row(row: dict, base: dict | None) -> list[str]:
    head = [row["recipe"], row["config"], row["model"], str(row["batch"]), f"{row['crop'][0]}x{row['crop'][1]}",
            row["amp"]]
    if "na" in row:  # the reason in the first measured column, the rest marked n/a
        return head + [row["na"]] + ["n/a"] * (len(COLUMNS) - len(head) - 1)
    tflops = row.get("tflops")
    mfu = row.get("mfu")
    return head + [
        f"{row['step_ms']:.1f}", f"{row['bare_ms']:.1f}", f"{row['overhead']:.2f}x", f"{row['img_s']:.1f}",
        f"{_sig(row['data_wait_ms'])} ({_sig(row['data_wait_pct'], 2)}%)", _fmt_mem(row),
        _sig(row["counted_flops"] / 1e9), _sig(row["projected_flops"] / 1e9),
        _sig(tflops) if tflops is not None else "-",
        f"{_sig(100 * mfu, 2)}%" if mfu is not None else "-",
        f"{base['step_ms'] / row['step_ms']:.2f}x" if base is not None and base is not row else "1.00x",
    ]


def markdown_table(rows: list[dict], bases: dict[str, dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(format_row(r, bases.get(r["recipe"]))) + " |")
    return "\n".join(lines)


def projection_line(row: dict, iters: int) -> str:
    total = iters * row["step_ms"] / 1e3
    return (f"- {row['recipe']} ({row['config']}): {iters:,} x {row['step_ms']:.1f} ms = {total:,.0f} s "
            f"= {total / 3600:.2f} h")


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", default="selftrain,stvm,diga_sf",
                   type=lambda s: parse_list(s, tuple(RECIPES), "--recipes"),
                   help=f"comma-separated, or 'all': {', '.join(RECIPES)}")
    p.add_argument("--method", action="append", default=[], metavar="RECIPE.KEY=VALUE",
                   help="a recipe hyper-parameter, e.g. diga_sf.reverse_weight=0 (repeatable; defaults otherwise)")
    p.add_argument("--model", default="tiny", choices=list(MODELS))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--crop", type=int, nargs=2, default=[512, 512], metavar=("H", "W"))
    p.add_argument("--amp", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--optim", default="adamw", choices=["adamw", "sgd"])
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (>= 1; compile needs a few)")
    p.add_argument("--steps", type=int, default=50, help="timed steps")
    p.add_argument("--data-size", type=parse_size, default=(720, 1280), metavar="WxH",
                   help="size of the images written to disk, width x height (default 1280x720)")
    p.add_argument("--num-images", type=int, default=32, help="images in the on-disk folder dataset")
    p.add_argument("--resize", type=int, nargs=2, default=None, metavar=("H", "W"), help="data.resize (H W)")
    p.add_argument("--scale-range", type=float, nargs=2, default=[0.5, 2.0], metavar=("LO", "HI"))
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers")
    p.add_argument("--switches", default="", type=lambda s: parse_list(s, SWITCHES, "--switches"),
                   help=f"comma-separated, 'all' or 'none': {', '.join(SWITCHES)}")
    p.add_argument("--switch-recipes", default=None, type=lambda s: parse_list(s, tuple(RECIPES), "--switch-recipes"),
                   help="recipes that get switch rows (default: the first of --recipes)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak TFLOP/s for MFU (790: H100 bf16, measured at this workplace)")
    p.add_argument("--project-iters", type=int, default=40000)
    p.add_argument("--workdir", type=Path, default=None, help="images, caches and run folders (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--md", type=Path, default=None, help="also write the printed report here")
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.batch < 1 or args.num_images < 1:
        p.error("--warmup, --steps, --batch and --num-images must be >= 1")
    if args.workers < 0:
        p.error("--workers must be >= 0")
    if not args.recipes:
        p.error("--recipes: name at least one recipe")
    try:
        args.method = [parse_override(m) for m in args.method]
    except ConfigError as e:
        p.error(f"--method: {e}")
    for key, _ in args.method:
        if "." not in key or key.split(".", 1)[0] not in RECIPES:
            p.error(f"--method {key}: expected RECIPE.KEY=VALUE with RECIPE one of {', '.join(RECIPES)}")
    switch_recipes = args.switch_recipes if args.switch_recipes is not None else args.recipes[:1]
    if set(switch_recipes) - set(args.recipes):
        p.error(f"--switch-recipes: {', '.join(sorted(set(switch_recipes) - set(args.recipes)))} not in --recipes")

    device = resolve_device(args.device)
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="sfdaseg_step_speed_")
        args.workdir = Path(tmp.name)
    args.workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    try:
        h, w = args.data_size
        data_root = write_images(args.workdir / f"images_{w}x{h}_{args.num_images}", num_images=args.num_images,
                                 size=args.data_size)
        rows: list[dict] = []
        bases: dict[str, dict] = {}
        for recipe in args.recipes:
            base_spec = RowSpec(recipe=recipe, amp=args.amp)
            base = measure(base_spec, args, device, data_root, count=True, calls=None)
            rows.append(base)
            bases[recipe] = base
            if recipe not in switch_recipes:
                continue
            helped: list[RowSpec] = []
            for name in args.switches:
                spec = switch_spec(name, base_spec, args, device)
                if isinstance(spec, str):
                    rows.append(na_row(replace(base_spec, label=name), args, spec))
                    continue
                row = measure(spec, args, device, data_root, count=False, calls=base["_calls"])
                row.update(counted_flops=base["counted_flops"], projected_flops=base["projected_flops"],
                           flops_from="base row")
                rows.append(row)
                if base["step_ms"] / row["step_ms"] > COMBINE_MIN_GAIN:
                    helped.append(spec)
            if len(helped) >= 2:
                combined = base_spec
                for s in helped:
                    combined = replace(combined, amp=s.amp if s.amp != base_spec.amp else combined.amp,
                                       **{k: True for k in ("channels_last", "fused", "compile", "eager_attention",
                                                            "cudnn_benchmark") if getattr(s, k)})
                combined = replace(combined, label="combined: " + " + ".join(s.label for s in helped))
                row = measure(combined, args, device, data_root, count=False, calls=base["_calls"])
                row.update(counted_flops=base["counted_flops"], projected_flops=base["projected_flops"],
                           flops_from="base row")
                rows.append(row)
    finally:
        if tmp is not None:
            tmp.cleanup()

    for r in rows:
        r.pop("_calls", None)
        if "na" in r:
            continue
        r["tflops"] = r["projected_flops"] / (r["step_ms"] / 1e3) / 1e12
        r["mfu"] = r["tflops"] / args.peak_tflops if args.peak_tflops else None

    machine = machine_info(device)
    machine["load_avg_1m_start"] = load_start
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    command = f"{env}python benchmarks/step_speed.py {shlex.join(argv)}".rstrip()
    where = (f"GPU {machine['gpu']} (CUDA {machine['cuda']}), CPU {machine['cpu']}" if machine["gpu"]
             else f"CPU {machine['cpu']} ({machine['cpu_count']} cores, torch threads {machine['torch_threads']})")
    if load_start is not None:
        where += f"; load average {load_start:.1f} at the start, {machine['load_avg_1m']:.1f} at the end"

    measured = [r for r in rows if "na" not in r]
    lines = [
        f"# Step speed: {args.model}, batch {args.batch}, crop {args.crop[0]}x{args.crop[1]}, {args.amp}",
        "",
        f"Machine: {where}; torch {machine['torch']}, torchvision {machine['torchvision']}, "
        f"transformers {machine['transformers']}, Python {machine['python']}",
        f"Reproduce: `{command}`",
        f"Data: {args.num_images} PNG images of {args.data_size[1]}x{args.data_size[0]} on disk, "
        f"{args.workers} DataLoader workers, resize {args.resize or 'none'}, scale {args.scale_range[0]}-"
        f"{args.scale_range[1]}, random crop + flip; {args.warmup} warm-up + {args.steps} timed steps; "
        f"optimizer {args.optim}; total {time.perf_counter() - t_start:.0f} s.",
        "",
        f"Projection for a {args.project_iters:,}-iteration run (iterations x median step):",
        *[projection_line(r, args.project_iters) for r in measured if r["config"] == "base"
          or r["config"].startswith("combined")],
        "",
        "step ms: median period of the real trainer loop (data wait included); bare ms: teacher forward(s) + "
        "student forward/backward + optimizer step on the same shapes; overhead = step / bare; "
        "GFLOP (counted): FlopCounterMode over one real step; 3F+1F: 3x forward of trained + 1x forward of frozen "
        "modules (TFLOP/s and MFU use it" + (f"; MFU against {args.peak_tflops:g} TFLOP/s)." if args.peak_tflops
                                              else "; MFU needs --peak-tflops).")
        + (" Peak mem on the CPU is the main process's RSS peak so far." if device.type != "cuda" else ""),
        "",
        markdown_table(rows, bases),
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.md is not None:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(text)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"machine": machine, "command": command, "columns": list(COLUMNS),
                   "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "rows": rows, "table": [dict(zip(COLUMNS, format_row(r, bases.get(r["recipe"]))))
                                           for r in rows],
                   "projection": [projection_line(r, args.project_iters) for r in measured
                                  if r["config"] == "base" or r["config"].startswith("combined")]}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
