"""The ``sfdaseg`` command line: parse -> load and validate the config -> call one run function.

Every command takes ``--config FILE`` and ``key=value`` overrides (``optim.lr=1e-4 data.crop=[512,512]``); the
flags are shortcuts for the keys set most often. Progress and tables go to stderr; a command that produces a
checkpoint prints its path as the last line of stdout, so ``ckpt=$(sfdaseg train-source ...)`` works.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib.metadata
import os
import shlex
import sys
import textwrap
import typing
from dataclasses import dataclass
from typing import Any, Callable

from sfdaseg import __version__
from sfdaseg.config import (AdaptConfig, BenchConfig, ConfigError, DemoConfig, DistillConfig, EvaluateConfig,
                            ExportConfig, PredictConfig, TrainSourceConfig, load_config, parse_override)
from sfdaseg.config_base import describe_range, type_name
from sfdaseg.data.datasets import DatasetError
from sfdaseg.engine.trainer import NonFiniteLossError
from sfdaseg.log import setup_logging
from sfdaseg.methods import RECIPES, get_recipe
from sfdaseg.models import WeightsError
from sfdaseg.runs.adapt import run_adapt
from sfdaseg.runs.bench import run_bench
from sfdaseg.runs.demo import run_demo
from sfdaseg.runs.distill import run_distill
from sfdaseg.runs.evaluate import run_evaluate
from sfdaseg.runs.export import run_export
from sfdaseg.runs.pipeline import run_pipeline
from sfdaseg.runs.predict import run_predict
from sfdaseg.runs.train_source import run_train_source
from sfdaseg.storage import CheckpointError


@dataclass(frozen=True)
class Flag:
    names: tuple[str, ...]
    key: str  # the config key it sets
    help: str
    switch: bool = False  # a boolean flag without a value
    comma_list: bool = False  # "a,b,c" -> ["a", "b", "c"]
    metavar: str | None = None


@dataclass(frozen=True)
class Command:
    name: str
    summary: str
    examples: str
    config_cls: type
    run: Callable[[Any], Any]
    flags: tuple[Flag, ...] = ()


def _run_adapt(cfg):
    # A `stages:` section makes it a multi-stage UniSFDA run: stage folders under train.out, the final model's path.
    return run_pipeline(cfg) if cfg.stages else run_adapt(cfg)


_ARGV: list[str] = []  # the command line being run, for reports that print how to reproduce them


def command_line(argv: list[str]) -> str:
    """The shell command that reruns ``sfdaseg ARGV``, quoted so that a pasted copy parses to the same arguments."""
    return shlex.join(["sfdaseg", *argv])


def _run_bench(cfg):
    run_bench(cfg, command=command_line(_ARGV))


def _no_result(run: Callable[[Any], Any]) -> Callable[[Any], None]:
    """For commands whose result is a table on stderr, not a path on stdout."""
    return lambda cfg: (run(cfg), None)[1]


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in [
        Command(
            "demo", "build the built-in benchmark, train a source model and a target oracle, evaluate, write a report",
            """\
            sfdaseg demo                      # the whole story on the built-in benchmark, 20-40 minutes on a 2-core CPU
            sfdaseg demo --out runs/demo2 --quick
            sfdaseg demo --device cuda iters=4000""",
            flags=(Flag(("--out",), "out", "run folder (default runs/demo)", metavar="DIR"),
                   Flag(("--quick",), "quick", "a much shorter run (smoke test)", switch=True),
                   Flag(("--device",), "device", "auto | cpu | cuda | cuda:N"),
                   ),
            config_cls=DemoConfig, run=run_demo,
        ),
        Command(
            "train-source", "supervised training on a labelled (source) dataset",
            """\
            sfdaseg train-source --model tiny --data synthetic:source:train --val synthetic:source:val \\
                --iters 2000 --out runs/src
            sfdaseg train-source --config configs/source/gta5_deeplabv2.yaml data.train=gta5:/data/gta5 \\
                model.weights=/models/resnet101.pth
            torchrun --nproc_per_node 4 -m sfdaseg train-source --config configs/source/gta5_segformer_b5.yaml
            sfdaseg train-source --config runs/src/config.yaml --resume   # continue an interrupted run""",
            flags=(Flag(("--model",), "model.name", "registered model name", metavar="NAME"),
                   Flag(("--weights",), "model.weights", "initial weights: a local file or Hugging Face folder",
                        metavar="PATH"),
                   Flag(("--data",), "data.train", "labelled training set KIND:ROOT[:SPLIT]", metavar="DS"),
                   Flag(("--val",), "data.val", "labelled validation set KIND:ROOT[:SPLIT]", metavar="DS"),
                   Flag(("--iters",), "train.iters", "optimizer steps", metavar="N"),
                   Flag(("--batch-size",), "data.batch_size", "images per step and process", metavar="N"),
                   Flag(("--out",), "train.out", "run folder", metavar="DIR"),
                   Flag(("--device",), "train.device", "auto | cpu | cuda | cuda:N"),
                   Flag(("--amp",), "train.amp", "fp32 | bf16 | fp16"),
                   Flag(("--seed",), "train.seed", "random seed", metavar="N"),
                   Flag(("--resume",), "train.resume", "continue the run in --out", switch=True)),
            config_cls=TrainSourceConfig, run=run_train_source,
        ),
        Command(
            "adapt", "source-free adaptation with a recipe (STvM, DiGA-SF, DUDA, UniSFDA, SFDA-Liu, baselines)",
            """\
            sfdaseg adapt --recipe stvm --checkpoint runs/src/model.ckpt --target synthetic:target:train \\
                --val synthetic:target:val --iters 2000 --out runs/stvm
            sfdaseg adapt --config configs/adapt/diga_sf_segformer_b5.yaml checkpoint=src.ckpt \\
                data.target=cityscapes:/data/cs:train data.val=cityscapes:/data/cs:val
            sfdaseg adapt --recipe selftrain --checkpoint src.ckpt --target folder:/data/new_city \\
                method.policy=class_balanced method.percentile=20 export=student""",
            flags=(Flag(("--recipe",), "recipe", "recipe name: selftrain | stvm | diga_sf | sfda_liu | duda | unisfda", metavar="NAME"),
                   Flag(("--checkpoint",), "checkpoint", "source model checkpoint", metavar="CKPT"),
                   Flag(("--target",), "data.target", "unlabelled target images KIND:ROOT[:SPLIT]", metavar="DS"),
                   Flag(("--val",), "data.val", "labelled validation split (evaluation at the end only)",
                        metavar="DS"),
                   Flag(("--iters",), "train.iters", "optimizer steps", metavar="N"),
                   Flag(("--out",), "train.out", "run folder", metavar="DIR"),
                   Flag(("--device",), "train.device", "auto | cpu | cuda | cuda:N"),
                   Flag(("--seed",), "train.seed", "random seed", metavar="N"),
                   Flag(("--resume",), "train.resume", "continue the run in --out", switch=True)),
            config_cls=AdaptConfig, run=_run_adapt,
        ),
        Command(
            "distill", "distil one or several adapted teachers into an efficient student",
            """\
            sfdaseg distill --teachers runs/a/model.ckpt,runs/b/model.ckpt --model lraspp_mobilenet_v3_large \\
                --target synthetic:target:train --iters 2000 --out runs/distill
            sfdaseg distill --teachers runs/duda/model.ckpt --student-checkpoint runs/src_small/model.ckpt \\
                --target cityscapes:/data/cs:train --val cityscapes:/data/cs:val data.crop=[512,512] \\
                temperature=2.0 ce_weight=1.0 --iters 20000 --out runs/distill_cs
            sfdaseg distill --teachers a.ckpt,b.ckpt --model tiny 'model_options={width: 8}' --iters 400 \\
                --val synthetic:target:val --out runs/distill_tiny""",
            flags=(Flag(("--teachers",), "teachers", "comma-separated adapted teacher checkpoints (frozen, "
                        "softmax averaged)", comma_list=True, metavar="CKPT[,CKPT]"),
                   Flag(("--model",), "model", "student architecture (a registered model name)", metavar="NAME"),
                   Flag(("--student-checkpoint",), "student_checkpoint",
                        "initial student weights, e.g. a small source model (its architecture by default)",
                        metavar="CKPT"),
                   Flag(("--target",), "data.target", "unlabelled target images KIND:ROOT[:SPLIT]", metavar="DS"),
                   Flag(("--val",), "data.val", "labelled validation split (evaluation at the end only)",
                        metavar="DS"),
                   Flag(("--iters",), "train.iters", "optimizer steps", metavar="N"),
                   Flag(("--out",), "train.out", "run folder", metavar="DIR"),
                   Flag(("--device",), "train.device", "auto | cpu | cuda | cuda:N"),
                   Flag(("--resume",), "train.resume", "continue the run in --out", switch=True)),
            config_cls=DistillConfig, run=run_distill,
        ),
        Command(
            "evaluate", "mIoU (19/16/13-class protocols), per-class IoU and pixel accuracy of a checkpoint",
            """\
            sfdaseg evaluate --checkpoint runs/src/model.ckpt --data synthetic:target:val
            sfdaseg evaluate --checkpoint m.ckpt --data cityscapes:/data/cs:val resize=[512,1024] --json cs.json
            sfdaseg evaluate --checkpoint m.ckpt --data synthia:/data/synthia --protocol 16
            sfdaseg evaluate --checkpoint m.ckpt --data cityscapes:/data/cs:val eval.mode=slide \\
                eval.crop=[512,512] eval.stride=[341,341] eval.flip=true""",
            flags=(Flag(("--checkpoint",), "checkpoint", "model checkpoint", metavar="CKPT"),
                   Flag(("--data",), "data", "labelled split KIND:ROOT[:SPLIT]", metavar="DS"),
                   Flag(("--protocol",), "eval.protocol", "19 | 16 | 13 (Cityscapes trainId subsets)", metavar="N"),
                   Flag(("--json",), "json", "write the metrics as JSON here", metavar="FILE"),
                   Flag(("--device",), "device", "auto | cpu | cuda | cuda:N")),
            config_cls=EvaluateConfig, run=_no_result(run_evaluate),
        ),
        Command(
            "predict", "class-index PNGs, colour masks and overlays for a folder of images",
            """\
            sfdaseg predict --checkpoint runs/stvm/model.ckpt --images /data/new_city --out preds/
            sfdaseg predict --checkpoint model.onnx --images photos/ --out preds/ --confidence --entropy
            sfdaseg predict --checkpoint m.ckpt --images /data/cs/leftImg8bit/test --out sub/ ids=labelid \\
                overlay=false color=false           # Cityscapes benchmark submission (labelIds)
            sfdaseg predict --checkpoint m.ckpt --images big/ --out preds/ --mode slide crop=[512,512] \\
                stride=[341,341] progress=false""",
            flags=(Flag(("--checkpoint",), "checkpoint", "model checkpoint, or an ONNX file from sfdaseg export",
                        metavar="CKPT"),
                   Flag(("--images",), "images", "folder of images (recursive) or one image", metavar="DIR"),
                   Flag(("--out",), "out", "output folder (labels/, color/, overlay/, ...)", metavar="DIR"),
                   Flag(("--device",), "device", "auto | cpu | cuda | cuda:N"),
                   Flag(("--batch-size",), "batch_size", "images of one size per forward pass", metavar="N"),
                   Flag(("--mode",), "mode", "auto | whole | slide (auto: slide above slide_above pixels)"),
                   Flag(("--confidence",), "confidence", "also write confidence maps", switch=True),
                   Flag(("--entropy",), "entropy", "also write entropy maps", switch=True)),
            config_cls=PredictConfig, run=run_predict,
        ),
        Command(
            "export", "ONNX export, checked against PyTorch with onnxruntime",
            """\
            sfdaseg export --checkpoint runs/distill/model.ckpt --out model.onnx
            sfdaseg export --checkpoint m.ckpt --out m.onnx --size [512,1024] tolerance=1e-4
            sfdaseg export --checkpoint m.ckpt --out m.onnx dynamic=false   # fixed input size (--size)""",
            flags=(Flag(("--checkpoint",), "checkpoint", "model checkpoint", metavar="CKPT"),
                   Flag(("--out",), "out", "ONNX file", metavar="FILE.onnx"),
                   Flag(("--size",), "size", "input size traced and checked (the size of a fixed-size graph)",
                        metavar="[H,W]"),
                   Flag(("--opset",), "opset", "ONNX opset (>= 17)", metavar="N")),
            config_cls=ExportConfig, run=run_export,
        ),
        Command(
            "bench", "many recipes x seeds on one benchmark, one table",
            """\
            sfdaseg bench --recipes selftrain,stvm,diga_sf --seeds 3 --out runs/bench   # built-in benchmark
            sfdaseg bench --ablations --source-checkpoint runs/demo/source/model.ckpt \\
                oracle_checkpoint=runs/demo/oracle/model.ckpt --out runs/bench_synthetic   # the README table
            sfdaseg bench --recipes stvm --source-checkpoint gta5_source.ckpt --target cityscapes:/data/cs:train \\
                --val cityscapes:/data/cs:val val_extra=[] oracle="" synthetic={} \\
                adapt_config=configs/adapt/{recipe}_segformer_b5.yaml adapt_iters=40000""",
            flags=(Flag(("--recipes",), "recipes", "comma-separated recipe names", metavar="a,b", comma_list=True),
                   Flag(("--seeds",), "seeds", "number of seeds", metavar="N"),
                   Flag(("--ablations",), "ablations", "add one row per removed part of each recipe", switch=True),
                   Flag(("--source-checkpoint",), "source_checkpoint", "reuse this source model", metavar="CKPT"),
                   Flag(("--target",), "target", "unlabelled target images", metavar="DS"),
                   Flag(("--val",), "val", "labelled target split that scores the results", metavar="DS"),
                   Flag(("--device",), "device", "auto | cpu | cuda | cuda:N"),
                   Flag(("--out",), "out", "output folder", metavar="DIR")),
            config_cls=BenchConfig, run=_run_bench,
        ),
    ]
}


# Said in the --help of the commands that train (the rule behind data.crop / data.scale_range).
_SIZE_RULE = ("data: without data.crop, the random scale (data.scale_range) is followed by a random crop (or "
              "padding) back to the image's own size, so images of one size always form a batch; with data.crop, "
              "every sample is cropped (and padded) to that size. Images of different sizes need data.crop or "
              "data.resize.")
_NOTES = {
    "train-source": _SIZE_RULE + " data.val defaults to the built-in benchmark's val split for synthetic data, "
                    "to none otherwise. Imbalanced classes: loss.class_weight=auto, loss.ohem=true, "
                    "model.aux_head=true (loss.aux_weight).",
    "adapt": _SIZE_RULE + " `sfdaseg adapt --recipe NAME --help` lists the recipe's method.* keys with their type, "
             "default, accepted values and origin. Recipes: " + ", ".join(RECIPES) + ".",
}


def package_version() -> str:
    try:
        return importlib.metadata.version("sfdaseg")
    except importlib.metadata.PackageNotFoundError:  # running from a checkout that was not installed
        return __version__


def recipe_help(name: str) -> str:
    """The ``method.*`` keys of recipe ``name``: type, default, accepted values, origin and meaning."""
    recipe = get_recipe(name)
    hints = typing.get_type_hints(recipe.config_cls)
    rows = [f"method.* keys of recipe {name!r} ({recipe.summary}); origin: published = the paper or its official "
            "code, reconstructed = the mechanism is published, the value is ours, ours = our design:", ""]
    for f in dataclasses.fields(recipe.config_cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        accepted = describe_range(f.metadata) or "-"
        rows.append(f"  method.{f.name}  {type_name(hints[f.name])} = {default!r}; accepted: {accepted}; "
                    f"{f.metadata.get('origin', 'ours')}. {f.metadata.get('help', '')}".rstrip())
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sfdaseg",
        description="Source-free domain adaptation for semantic segmentation.",
        epilog="Every command takes --config FILE and key=value overrides; `sfdaseg COMMAND --help` shows examples.",
    )
    parser.add_argument("--version", action="version", version=f"sfdaseg {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.commands = {}  # type: ignore[attr-defined]
    for cmd in COMMANDS.values():
        notes = f"\n\n{textwrap.fill(_NOTES[cmd.name], 110)}" if cmd.name in _NOTES else ""
        p = sub.add_parser(
            cmd.name, help=cmd.summary, description=cmd.summary,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog="examples:\n" + textwrap.indent(textwrap.dedent(cmd.examples), "  ")
            + "\n\nkey=value overrides set any config key (a.b=c); values are YAML ([1, 2], null, true)." + notes,
        )
        parser.commands[cmd.name] = p  # type: ignore[attr-defined]
        p.add_argument("--config", metavar="FILE", help="YAML config; flags and key=value overrides win over it")
        for f in cmd.flags:
            if f.switch:
                p.add_argument(*f.names, dest=f.key, action="store_const", const=True, default=None,
                               help=f"{f.help} (= {f.key}=true)")
            else:
                p.add_argument(*f.names, dest=f.key, metavar=f.metavar or f.key.split(".")[-1].upper(),
                               default=None, help=f"{f.help} (= {f.key})")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def _flag_values(cmd: Command, ns: argparse.Namespace) -> dict[str, Any]:
    """Flag strings are parsed like override values, so types are checked (and reported) in one place."""
    out = {}
    for f in cmd.flags:
        v = getattr(ns, f.key, None)
        if v is None:
            continue
        if f.comma_list:
            out[f.key] = [x.strip() for x in v.split(",") if x.strip()]
        else:
            out[f.key] = v if f.switch else parse_override(f"{f.key}={v}")[1]
    return out


def error_line(e: BaseException) -> str:
    """The user's one line for a bad-input error, also when a DataLoader worker raised it.

    PyTorch re-raises a worker's exception in the main process with the worker's traceback in the message
    ("Caught DatasetError in DataLoader worker process 0. Original Traceback ..."); the last line of that traceback
    is the error itself. ``SFDASEG_DEBUG=1`` keeps the whole message.
    """
    text = str(e)
    if "Original Traceback" not in text or os.environ.get("SFDASEG_DEBUG") == "1":
        return text
    last = [ln for ln in text.strip().splitlines() if ln.strip()][-1]
    name = type(e).__name__
    head, sep, rest = last.partition(": ")
    return rest if sep and head.split(".")[-1] == name else last


def _help_recipe(argv: list[str]) -> str | None:
    """``adapt --help`` naming a recipe (``--recipe R`` or ``recipe=R``): that recipe, else None."""
    if argv[:1] != ["adapt"] or not ({"-h", "--help"} & set(argv)):
        return None
    for i, a in enumerate(argv):
        if a == "--recipe" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(("--recipe=", "recipe=")):
            return a.split("=", 1)[1]
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = list(sys.argv[1:] if argv is None else argv)
    recipe = _help_recipe(args)
    if recipe is not None:
        try:
            get_recipe(recipe)
        except ConfigError as e:
            print(f"sfdaseg adapt: error: {e}", file=sys.stderr)
            return 2
        print(parser.commands["adapt"].format_help())  # type: ignore[attr-defined]
        print(recipe_help(recipe))
        return 0
    # key=value overrides may sit before, between or after the flags: argparse's nargs="*" positional takes only
    # one contiguous group, so the rest come back as unknown arguments and are collected here.
    ns, unknown = parser.parse_known_args(argv)
    _ARGV[:] = list(sys.argv[1:] if argv is None else argv)
    stray = [a for a in unknown if a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if ns.command is not None:
        ns.overrides = list(ns.overrides) + unknown
    if ns.command is None:
        parser.print_help()
        return 2
    cmd = COMMANDS[ns.command]
    prog = f"sfdaseg {cmd.name}"
    setup_logging()
    try:
        for o in ns.overrides:
            parse_override(o)  # a stray word gets "expected key=value" before any work starts
        cfg = load_config(cmd.config_cls, file=ns.config, flags=_flag_values(cmd, ns), overrides=ns.overrides)
        result = cmd.run(cfg)
    except (ConfigError, DatasetError, CheckpointError, WeightsError) as e:
        print(f"{prog}: error: {error_line(e)}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, OSError) as e:  # the run stopped, its last checkpoint is kept: no traceback needed
        if isinstance(e, OSError) and e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        hint = "; free some space, then rerun with --resume (or resume=true)" if isinstance(e, OSError) else ""
        print(f"{prog}: error: {e}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; rerun with --resume (or resume=true) to continue", file=sys.stderr)
        return 130
    if result is not None and os.environ.get("RANK", "0") == "0":
        print(result, flush=True)  # the checkpoint path, last line of stdout (once, from rank 0 under torchrun)
    return 0


if __name__ == "__main__":
    sys.exit(main())
