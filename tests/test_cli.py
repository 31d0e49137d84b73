"""The command line: help for every command of the design, errors that name keys, the demo end to end."""

import json
import subprocess

import pytest

from sfdaseg.cli import COMMANDS, main

DESIGN_COMMANDS = ["demo", "train-source", "adapt", "distill", "evaluate", "predict", "export", "bench"]


def test_help_lists_every_command(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for name in DESIGN_COMMANDS:
        assert name in out
    assert set(COMMANDS) == set(DESIGN_COMMANDS)


@pytest.mark.parametrize("name", DESIGN_COMMANDS)
def test_each_command_has_help_with_examples(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"sfdaseg {name}" in out and "--config" in out
    for flag in COMMANDS[name].flags:
        assert flag.names[0] in out


def test_no_command_is_pending(capsys):
    # Every command of the design is implemented (distill landed with issue 5).
    assert [n for n, c in COMMANDS.items() if c.run is None] == []
    for name in ("predict", "export"):  # implemented: they run (here they stop at the missing checkpoint)
        assert COMMANDS[name].run is not None
        assert main([name, "--checkpoint", "missing.ckpt"]) == 2
        assert "checkpoint: no such file: missing.ckpt" in capsys.readouterr().err


def test_unknown_key_error_names_key_and_suggests(capsys):
    assert main(["train-source", "optim.lrr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "optim.lrr" in err and "Did you mean: lr" in err


def test_bad_flag_value_names_key(capsys, tmp_path):
    assert main(["train-source", "--iters", "many", "--out", str(tmp_path / "x")]) == 2
    assert "train.iters: expected int, got 'many'" in capsys.readouterr().err
    assert main(["train-source", "--iters", "0", "--out", str(tmp_path / "x")]) == 2
    assert "train.iters: expected a positive" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_bad_value_in_file_names_file(capsys, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  amp: fp8\n")
    assert main(["train-source", "--config", str(f)]) == 2
    err = capsys.readouterr().err
    assert "train.amp" in err and str(f) in err and "fp32, bf16, fp16" in err


def test_train_then_evaluate_through_the_cli(tmp_path, cli_env, python):
    out = tmp_path / "src"
    train = subprocess.run(
        [python, "-m", "sfdaseg", "train-source", "--model", "tiny", "--data", "synthetic:source:train",
         "--val", "synthetic:source:val", "--iters", "3", "--out", str(out), "--device", "cpu",
         "model.options={width: 8}", "data.synthetic={size: [32, 64], length: 8}", "data.num_workers=0",
         "data.crop=[32,64]", "train.progress=false"],
        env=cli_env, capture_output=True, text=True, timeout=120)
    assert train.returncode == 0, train.stderr[-2000:]
    ckpt = train.stdout.strip().splitlines()[-1]
    assert ckpt == str(out / "model.ckpt")
    resolved = (out / "config.yaml").read_text()
    assert resolved.startswith("# sfdaseg train-source") and "iters: 3" in resolved
    assert json.loads((out / "eval.json").read_text())["num_images"] == 8

    ev = subprocess.run(
        [python, "-m", "sfdaseg", "evaluate", "--checkpoint", ckpt, "--data", "synthetic:target:val",
         "--json", str(tmp_path / "m.json"), "--device", "cpu", "synthetic={size: [32, 64], length: 6}",
         "num_workers=0"],
        env=cli_env, capture_output=True, text=True, timeout=120)
    assert ev.returncode == 0, ev.stderr[-2000:]
    result = json.loads((tmp_path / "m.json").read_text())
    for key in ("miou", "per_class_iou", "pixel_accuracy", "protocol", "num_images"):
        assert key in result
    assert result["num_images"] == 6
    assert "road" in result["per_class_iou"]
    assert "mIoU" in ev.stderr or "mean" in ev.stderr.lower()


def test_demo_quick(tmp_path):
    """The demo's whole pipeline at smoke-test length: metrics.json and report.md with the required keys."""
    from sfdaseg.config import DemoConfig
    from sfdaseg.runs.demo import run_demo

    out = tmp_path / "demo"
    ckpt = run_demo(DemoConfig(out=str(out), quick=True, device="cpu", size=(32, 64)))
    assert ckpt.exists()
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("source_only", "adapted", "oracle"):
        assert 0.0 <= metrics[key]["miou"] <= 100.0
        assert "road" in metrics[key]["per_class_iou"]
    assert metrics["gap_closure"] == pytest.approx(
        (metrics["adapted"]["miou"] - metrics["source_only"]["miou"]) / metrics["gap"])
    report = (out / "report.md").read_text()
    assert "Per-class IoU" in report and "predictions.png" in report
    assert (out / "predictions.png").stat().st_size > 1000
    assert (out / "pseudo_labels.png").stat().st_size > 1000
    # A second run reuses the finished stages instead of training again.
    mtime = (out / "source" / "model.ckpt").stat().st_mtime_ns
    run_demo(DemoConfig(out=str(out), quick=True, device="cpu", size=(32, 64)))
    assert (out / "source" / "model.ckpt").stat().st_mtime_ns == mtime


def test_overrides_may_sit_between_flags(capsys, tmp_path):
    assert main(["train-source", "--iters", "2", "optim.lrr=1", "--out", str(tmp_path / "x"), "train.amp=fp8"]) == 2
    assert "optim.lrr" in capsys.readouterr().err
    # A word that is not key=value is refused wherever it sits, naming the word.
    assert main(["train-source", "--iters", "2", "stray", "--out", str(tmp_path / "x")]) == 2
    assert "'stray': expected key=value" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train-source", "--iters", "2", "a=1", "--out", str(tmp_path / "x"), "stray"])
    assert "unrecognized arguments: stray" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_adapt_help_names_every_recipe():
    from sfdaseg.methods import RECIPES

    flag = next(f for f in COMMANDS["adapt"].flags if f.key == "recipe")
    assert all(name in flag.help for name in RECIPES)


def test_the_printed_bench_command_reruns_with_the_same_arguments():
    # A bench prints the command that reproduces it; flow lists with spaces must survive a paste into a shell.
    import shlex

    from sfdaseg.cli import command_line
    from sfdaseg.config import parse_override

    argv = ["bench", "recipes=[selftrain, stvm]", "overrides=[data.batch_size=8, 'data.crop=[128,128]']",
            "--out", "runs/b"]
    line = command_line(argv)
    assert shlex.split(line) == ["sfdaseg", *argv]
    assert parse_override(shlex.split(line)[2]) == ("recipes", ["selftrain", "stvm"])
    assert parse_override(shlex.split(line)[3])[1] == ["data.batch_size=8", "data.crop=[128,128]"]
