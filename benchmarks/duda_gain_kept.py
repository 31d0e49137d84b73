"""How much of its large teacher's gain DUDA's small student keeps, from the runs of a finished ``sfdaseg bench``.

DUDA delivers a small student and saves its large EMA teacher beside it (``RUN/large_teacher.ckpt``). Its claim
is that the student inherits the teacher's adaptation; the measure is, per seed,

    kept = (student - small source) / (teacher - small source)

on the bench's test split (goal >= 0.9), with the small source model the student started from (the
``method.student_checkpoint`` of the runs). Scores come from the bench's own scorer with the bench's own config
(``OUT/results.json``), cached beside each checkpoint like the bench's::

    python benchmarks/duda_gain_kept.py runs/final/real --small-source runs/base/real_source_w16/model.ckpt

Labels are read here only to score finished runs; nothing is chosen with them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from sfdaseg.config import BenchConfig
from sfdaseg.config_base import ConfigError, from_dict
from sfdaseg.log import setup_logging
from sfdaseg.runs.bench import Scorer
from sfdaseg.engine.distributed import resolve_device


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="the --out folder of a finished `sfdaseg bench` with a duda row")
    ap.add_argument("--small-source", required=True, help="the small source checkpoint the students started from")
    ap.add_argument("--row", default="duda", help="the bench row (default duda)")
    a = ap.parse_args(argv)
    setup_logging()
    out = Path(a.out)
    try:
        data = json.loads((out / "results.json").read_text())
        cfg = from_dict(BenchConfig, data["config"], source=str(out / "results.json"), validate=False)
    except (OSError, ValueError, KeyError, ConfigError) as e:
        print(f"error: {out / 'results.json'}: expected the results of a finished `sfdaseg bench` ({e})",
              file=sys.stderr)
        return 2
    runs = sorted((out / a.row).glob("seed*/large_teacher.ckpt"))
    small = Path(a.small_source)
    if not runs or not small.is_file():
        print(f"error: expected {out / a.row}/seed*/large_teacher.ckpt and the file {small}", file=sys.stderr)
        return 2
    scorer = Scorer(cfg, resolve_device(cfg.device))
    base = scorer(small)["test"]
    print(f"small source {small}: test {base:.1f}\n")
    print("| seed | small source | large teacher | small student (delivered) | gain kept |")
    print("|---|---:|---:|---:|---:|")
    kept = []
    for teacher in runs:
        t = scorer(teacher)["test"]
        s = scorer(teacher.with_name("model.ckpt"))["test"]
        k = (s - base) / (t - base) if t != base else float("nan")
        kept.append(k)
        print(f"| {teacher.parent.name} | {base:.1f} | {t:.1f} | {s:.1f} | {100 * k:.0f}% |")
    if len(kept) > 1:
        print(f"\nmean gain kept {100 * statistics.fmean(kept):.0f}% over {len(kept)} seeds (goal >= 90%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
