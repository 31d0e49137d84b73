"""Cost of MC-dropout uncertainty as a ratio to one forward pass, for T = 1, 4, 8, 16 passes.

``sfdaseg.uncertainty.mc_dropout`` runs the backbone once and samples only the classifier ``T`` times, so its
cost should stay close to one forward pass (goal: T = 8 under 1.5x). Models are built with random weights
(no weights file: nothing is downloaded); timing does not depend on the weights.

    python benchmarks/mc_dropout_cost.py --models deeplabv2_r101,segformer_b5 --size 512 1024 --device cuda
    OMP_WAIT_POLICY=PASSIVE OMP_NUM_THREADS=2 python benchmarks/mc_dropout_cost.py \\
        --models tiny,lraspp_mobilenet_v3_large,deeplabv2_r101 --size 128 256 --device cpu --clock cpu

On a busy shared CPU machine the wall clock mostly measures the other processes: ``--clock cpu`` times the
process's CPU time instead, with ``OMP_WAIT_POLICY=PASSIVE`` so that idle OpenMP threads sleep rather than spin
(spinning would count as CPU time).

Each round times one plain forward (``model(x)``, or forward + upsampling + softmax with ``--upsample``) and
``mc_dropout`` for every ``T``, interleaved so that drift of a shared machine hits all of them alike; a GPU is
synchronised before and after each timed call. Reports the median over ``--repeats`` rounds after
``--warmup`` rounds, as a markdown table with the command and the machine on top (``--out`` also writes it).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from sfdaseg.engine.distributed import resolve_device
from sfdaseg.evaluation.inference import autocast_context
from sfdaseg.models import build_model
from sfdaseg.uncertainty import mc_dropout, mc_dropout_features

GOAL_PASSES, GOAL_RATIO = 8, 1.5


@dataclass
class Row:
    model: str
    forward_ms: float
    mc_ms: dict[int, float] = field(default_factory=dict)
    head_ms: dict[int, float] = field(default_factory=dict)  # the T sampled classifier passes alone

    def ratio(self, passes: int) -> float:
        return self.mc_ms[passes] / self.forward_ms


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        cpu = platform.processor() or platform.machine()
        what = f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return f"{what}; torch {torch.__version__}; Python {platform.python_version()}; {platform.system()}"


def _timer(device: torch.device, clock: str = "wall") -> Callable[[Callable[[], object]], float]:
    # "cpu": CPU time of this process (all its threads), for a CPU run on a shared machine, where wall time
    # mostly measures the other processes; a GPU is always timed by the wall clock.
    now = time.process_time if clock == "cpu" and device.type == "cpu" else time.perf_counter

    def run(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # time the work, not the queue
        t = now()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (now() - t) * 1000.0

    return run


def measure(
    name: str,
    *,
    size: tuple[int, int],
    batch: int,
    passes: list[int],
    device: torch.device,
    amp: str = "fp32",
    warmup: int = 2,
    repeats: int = 10,
    num_classes: int = 19,
    upsample: bool = False,
    seed: int = 0,
    clock: str = "wall",
) -> Row:
    """Median milliseconds of one forward and of ``mc_dropout`` for each ``T`` on one model."""
    torch.manual_seed(seed)
    model = build_model(name, num_classes=num_classes).to(device).eval()
    x = torch.rand(batch, 3, *size, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out_size = tuple(size) if upsample else None

    def forward() -> object:
        with torch.no_grad(), autocast_context(amp, device):
            logits = model(x)
            if upsample:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False).float().softmax(1)
            return logits

    def mc(t: int) -> Callable[[], object]:
        def fn() -> object:
            with autocast_context(amp, device):
                return mc_dropout(model, x, passes=t, generator=gen, out_size=out_size)

        return fn

    with torch.no_grad(), autocast_context(amp, device):
        features = model.extract(x)

    def head(t: int) -> Callable[[], object]:
        def fn() -> object:
            with autocast_context(amp, device):
                return mc_dropout_features(model, features, passes=t, generator=gen, out_size=out_size)

        return fn

    timed = _timer(device, clock)
    # keys: 0 = forward, T = mc_dropout with T passes, -T = its head part alone
    fns = {0: forward, **{t: mc(t) for t in passes}, **{-t: head(t) for t in passes}}
    times: dict[int, list[float]] = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for k, fn in fns.items():
            ms = timed(fn)
            if r >= warmup:
                times[k].append(ms)
    row = Row(model=name, forward_ms=statistics.median(times[0]))
    row.mc_ms = {t: statistics.median(times[t]) for t in passes}
    row.head_ms = {t: statistics.median(times[-t]) for t in passes}
    return row


def table(rows: list[Row], passes: list[int], *, command: str, header: str) -> str:
    lines = [
        f"Reproduce: `{command}`",
        "",
        header,
        "",
        "| model | forward (ms) | " + " | ".join(f"T={t}" for t in passes)
        + (f" | T={GOAL_PASSES} < {GOAL_RATIO}x |" if GOAL_PASSES in passes else " |"),
        "|---|---:|" + "---:|" * len(passes) + ("---|" if GOAL_PASSES in passes else ""),
    ]
    for row in rows:
        cells = [f"{row.ratio(t):.2f}x ({row.mc_ms[t]:.1f} ms; head {row.head_ms[t]:.1f} ms)" for t in passes]
        goal = (" | " + ("yes" if row.ratio(GOAL_PASSES) < GOAL_RATIO else "no")) if GOAL_PASSES in passes else ""
        lines.append(f"| {row.model} | {row.forward_ms:.1f} | " + " | ".join(cells) + goal + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="deeplabv2_r101,segformer_b5", help="comma-separated model names")
    p.add_argument("--size", type=int, nargs=2, default=[512, 1024], metavar=("H", "W"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--passes", default="1,4,8,16", help="comma-separated T values")
    p.add_argument("--amp", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--device", default="auto")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--num-classes", type=int, default=19)
    p.add_argument("--upsample", action="store_true",
                   help="upsample each pass's logits to the input size (baseline: forward + upsample + softmax)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: time CPU runs by the process's CPU time (robust on a busy shared machine)")
    p.add_argument("--out", type=Path, help="also write the table to this file")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    passes = [int(t) for t in args.passes.split(",") if t.strip()]
    if not models or not passes or min(passes) < 1:
        p.error("--models and --passes need at least one entry; passes must be >= 1")
    if args.repeats < 1 or args.warmup < 0 or args.batch < 1:
        p.error("--repeats and --batch must be >= 1, --warmup >= 0")
    device = resolve_device(args.device)
    size = (args.size[0], args.size[1])

    rows = []
    t0 = time.perf_counter()
    for name in models:
        rows.append(measure(name, size=size, batch=args.batch, passes=passes, device=device, amp=args.amp,
                            warmup=args.warmup, repeats=args.repeats, num_classes=args.num_classes,
                            upsample=args.upsample, clock=args.clock))
        print(f"{name}: forward {rows[-1].forward_ms:.1f} ms", file=sys.stderr, flush=True)

    argv_text = " ".join(argv if argv is not None else sys.argv[1:])
    env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")
                   if device.type == "cpu" and os.environ.get(k))
    command = f"{env} python benchmarks/mc_dropout_cost.py {argv_text}".strip()
    header = (
        f"MC-dropout cost as a ratio to one forward pass (median of {args.repeats} timed runs after "
        f"{args.warmup} warm-up runs; in brackets: ms of the whole call, and of the T sampled classifier passes "
        f"alone on precomputed features). Input {args.batch}x3x{size[0]}x{size[1]}, "
        f"{args.num_classes} classes, amp {args.amp}, "
        f"{'logits upsampled to the input size per pass' if args.upsample else 'output at the model stride'}, "
        f"random weights, "
        f"{'process CPU time (all threads)' if args.clock == 'cpu' and device.type == 'cpu' else 'wall time'}. "
        f"Machine: {machine(device)}. Goal: T={GOAL_PASSES} under {GOAL_RATIO}x."
    )
    text = table(rows, passes, command=command, header=header)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
