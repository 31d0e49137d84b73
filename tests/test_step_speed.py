"""benchmarks/step_speed.py at smoke-test size on the CPU: every column is there and holds finite positive numbers.

No timing thresholds: the numbers are measurements, only their presence and sanity are checked.
"""

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

NUMERIC = ("step_ms", "bare_ms", "overhead", "img_s", "data_wait_ms", "data_wait_pct", "peak_mem_bytes",
           "counted_flops", "projected_flops", "tflops", "mfu")


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses resolve string annotations through the module's entry
    spec.loader.exec_module(mod)
    return mod


def _number(cell: str) -> float:
    m = re.match(r"^\s*([0-9][0-9,]*\.?[0-9]*)", cell)
    assert m, f"not a number: {cell!r}"
    return float(m.group(1).replace(",", ""))


@pytest.fixture
def one_thread():
    # One intra-op thread: on a shared 2-core machine two OpenMP threads plus a DataLoader worker stall on
    # each other's barriers (the run takes 10x longer), and a smoke test has nothing to gain from them.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_step_speed_smoke(tmp_path, capsys, one_thread):
    bench = load("step_speed")
    out = tmp_path / "speed.json"
    md = tmp_path / "speed.md"
    argv = ["--model", "tiny", "--batch", "2", "--crop", "64", "64", "--warmup", "2", "--steps", "2",
            "--recipes", "selftrain,stvm,diga_sf", "--data-size", "96x64", "--num-images", "8", "--workers", "1",
            "--device", "cpu", "--switches", "channels_last,fused", "--peak-tflops", "1",
            "--workdir", str(tmp_path / "work"), "--json", str(out), "--md", str(md)]
    assert bench.main(argv) == 0
    text = capsys.readouterr().out
    assert md.read_text() == text
    assert "Reproduce: `" in text and "--model tiny" in text and "Machine: CPU" in text

    # The table: every column in the header; every measured row has a number in every numeric column.
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == list(bench.COLUMNS)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    by_config = {(r[0], r[1]): r for r in rows}
    assert {("selftrain", "base"), ("stvm", "base"), ("diga_sf", "base"), ("selftrain", "+channels_last"),
            ("selftrain", "fused")} == set(by_config)
    assert by_config[("selftrain", "fused")][6] == "n/a (CUDA only)"  # a CUDA-only switch is shown, not dropped
    for key, r in by_config.items():
        assert len(r) == len(header)
        if key[1] == "fused":
            continue
        for col in header[6:]:
            value = _number(r[header.index(col)])
            assert math.isfinite(value) and value > 0, (key, col, r)

    # The JSON: the same rows with raw numbers, the machine, the command and the 40k projection.
    data = json.loads(out.read_text())
    assert data["machine"]["torch"] == torch.__version__ and data["machine"]["cpu"]
    assert "python benchmarks/step_speed.py --model tiny --batch 2" in data["command"]
    measured = [r for r in data["rows"] if "na" not in r]
    assert len(measured) == 4 and len(data["rows"]) == 5
    for r in measured:
        for k in NUMERIC:
            assert math.isfinite(r[k]) and r[k] > 0, (r["recipe"], r["config"], k, r[k])
        assert len(r["step_ms_all"]) == 2 and len(r["bare_ms_all"]) == 2
    calls = {r["recipe"]: r["calls"] for r in measured if r["config"] == "base"}
    # The bare floor replays what each recipe runs: one teacher forward (two for diga_sf, whose student sees
    # both views in one batch of 2B).
    assert [c["role"] for c in calls["selftrain"]].count("teacher") == 1
    assert [c["role"] for c in calls["diga_sf"]].count("teacher") == 2
    assert [c["shape"][0] for c in calls["diga_sf"] if c["role"] == "student"] == [4]
    assert "metric" in {c["role"] for c in calls["stvm"]}
    assert len(data["projection"]) == 3 and all(" x " in line and " h" in line for line in data["projection"])
    assert "40,000 x" in text
