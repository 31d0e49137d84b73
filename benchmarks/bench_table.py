"""Markdown table of a finished ``sfdaseg bench`` folder, with every seed's test mIoU and the guard's decisions.

``sfdaseg bench`` prints means; a report that claims "never below source-only" also needs each run, so this
reads ``OUT/results.json`` (written by the bench, atomically, after every run) and prints one row per recipe or
variant: seeds, test mean +- std, the per-seed values, gap closure, runs below source-only (those four as the
bench computed them), runs the collapse guard rolled back (with the
step it delivered), and the val mean (the split settings are chosen on)::

    python benchmarks/bench_table.py runs/final/real            # prints the table
    python benchmarks/bench_table.py runs/final/real --json      # the same numbers as JSON

No label is read here: the scores are the bench's own.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def _f(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x:.1f}"


def rows(results: dict) -> tuple[float, float, list[dict]]:
    """Per-recipe rows of ``results.json['results']``; returns (source test mIoU, oracle test mIoU, rows).

    Means, std, closure and the count below source-only are the bench's own (``test_mean``, ``test_std``,
    ``val_mean``, ``gap_closure``, ``below_source``); this adds the per-seed values and the delivered steps.
    """
    src = results["source-only"]["test_mean"]
    orc = results.get("oracle", {}).get("test_mean", math.nan)
    out = []
    for name, r in results.items():
        if name in ("source-only", "oracle"):
            continue
        closure = r.get("gap_closure")
        out.append({
            "name": name, "seeds": r.get("seeds", []), "test": [run["test"] for run in r["runs"]],
            "test_mean": r["test_mean"], "test_std": r["test_std"], "val_mean": r.get("val_mean"),
            "closure": math.nan if closure is None else closure, "below": r["below_source"],
            "rolled_back": [g.get("delivered_step") for g in r.get("guard", []) if g.get("rolled_back")],
            "runs": len(r["runs"]),
        })
    return src, orc, out


def markdown(results: dict) -> str:
    src, orc, table = rows(results)
    vs = results["source-only"].get("val_mean", math.nan)
    vo = results.get("oracle", {}).get("val_mean", math.nan)
    lines = [
        "| model | seeds | test mIoU, mean +- std | per seed | gap closure | runs below source-only "
        "| guard rolled back (delivered step) | val mIoU (for choosing) |",
        "|---|---:|---:|---|---:|---:|---|---:|",
        f"| source-only | - | {src:.1f} | | - | - | - | {_f(vs)} |",
        f"| target oracle | - | {_f(orc)} | | - | - | - | {_f(vo)} |",
    ]
    for r in table:
        rb = f"{len(r['rolled_back'])}/{r['runs']}"
        closure = "-" if r["closure"] != r["closure"] else f"{100 * r['closure']:.0f}%"
        if r["rolled_back"]:
            rb += " (step " + ", ".join(str(s) for s in r["rolled_back"]) + ")"
        lines.append(
            f"| `{r['name']}` | {r['runs']} | {r['test_mean']:.1f} +- {r['test_std']:.1f} | "
            f"{' / '.join(f'{t:.1f}' for t in r['test'])} | {closure} | {r['below']}/{r['runs']} "
            f"| {rb} | {_f(r['val_mean'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="the --out folder of a finished `sfdaseg bench`")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    a = ap.parse_args(argv)
    path = Path(a.out) / "results.json"
    try:
        data = json.loads(path.read_text())
        results = data["results"]
        results["source-only"]["test_mean"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"error: {path}: expected the results.json of a finished `sfdaseg bench` ({e})", file=sys.stderr)
        return 2
    if a.json:
        src, orc, table = rows(results)
        print(json.dumps({"source": src, "oracle": orc, "rows": table}, indent=1))
    else:
        print(f"`{data.get('command', '')}`\n")
        print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
