"""Typed configs: dataclasses, YAML files, ``key=value`` overrides, validation and the resolved dump.

A config is a dataclass of sections (themselves dataclasses of plain fields). Loading goes
``defaults -> YAML file -> command-line shortcut flags -> key=value overrides``; every key is checked against the
dataclass fields, every value against the field's type and choices, and errors name the key, where it came from
(the file, or "command line") and what is accepted, with a close-match suggestion for typos.

Only plain types appear in configs (bool, int, float, str, None, lists/tuples of those, string-keyed dicts), so a
resolved config is YAML- and checkpoint-safe (``torch.load(weights_only=True)`` can read it back).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key, its source and what is accepted."""


def choices(*values: Any, default: Any = MISSING, help: str = "") -> Any:
    """A field restricted to ``values`` (checked on load)."""
    kw = {} if default is MISSING else {"default": default}
    return field(metadata={"choices": tuple(values), "help": help}, **kw)


def _suggest(key: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(options), n=3, cutoff=0.6)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        inner = _type_name(args[0]) if args else "any"
        return f"list of {inner}"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against type ``tp`` and return it in canonical form; raise ConfigError otherwise."""
    origin = get_origin(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__}) in {source}")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, source)
            except ConfigError as e:
                errors.append(e)
        raise bad
    if origin is Literal:
        if value in get_args(tp):
            return value
        opts = [str(a) for a in get_args(tp)]
        raise ConfigError(
            f"{key}: {value!r} is not one of {', '.join(opts)} (in {source}).{_suggest(str(value), opts)}"
        )
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise bad
        args = [a for a in get_args(tp) if a is not Ellipsis]
        if origin is tuple and args and Ellipsis not in get_args(tp) and len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)} ({value!r}) in {source}")
        if origin is tuple and len(args) > 1 and Ellipsis not in get_args(tp):
            return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, Mapping):
            raise bad
        return {str(k): v for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise bad


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: Mapping[str, Any] | None, *, source: str = "defaults", prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested mapping, checking keys and types."""
    data = dict(data or {})
    hints = _hints(cls)
    names = [f.name for f in fields(cls)]
    for key in data:
        if key not in names:
            where = f"section '{prefix[:-1]}'" if prefix else "the top level"
            raise ConfigError(
                f"unknown key '{prefix}{key}' in {source}; accepted keys of {where}: {', '.join(names)}."
                f"{_suggest(key, names)}"
            )
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        value = data[f.name]
        full = f"{prefix}{f.name}"
        if is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{full}: expected a mapping (a section), got {value!r} in {source}")
            kwargs[f.name] = from_dict(tp, value, source=source, prefix=f"{full}.")
        else:
            value = _coerce(value, tp, full, source)
            opts = f.metadata.get("choices")
            if opts is not None and value not in opts:
                raise ConfigError(
                    f"{full}: {value!r} is not one of {', '.join(map(str, opts))} (in {source})."
                    f"{_suggest(str(value), [str(o) for o in opts])}"
                )
            kwargs[f.name] = value
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict (lists instead of tuples), safe for YAML and weights-only checkpoints."""

    def plain(v: Any) -> Any:
        if is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: ``update`` wins; sections merge key by key."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=1e-4"`` -> ``("optim.lr", 1e-4)``; the value is parsed as YAML (so ``[1, 2]``, ``null``, ``true``)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value, e.g. optim.lr=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads "1e-4" as a string (YAML 1.1 needs a dot); accept it as the number users mean.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") and value.strip() else value
        except ValueError:
            pass
    return key, value


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        d = out
        for p in parts[:-1]:
            nxt = d.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{key}': '{p}' is a value, not a section")
            d = nxt
        d[parts[-1]] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def load_config(
    cls: type[T],
    *,
    file: str | Path | None = None,
    flags: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
) -> T:
    """Defaults, then ``file``, then shortcut ``flags`` (dotted keys), then ``key=value`` overrides; validated.

    Each layer is checked on its own so an error names the layer it came from.
    """
    data: dict[str, Any] = {}
    if file is not None:
        layer = load_yaml(file)
        from_dict(cls, layer, source=str(file))  # checks keys and types, naming the file
        data = merge(data, layer)
    if flags:
        layer = nest({k: v for k, v in flags.items() if v is not None})
        from_dict(cls, layer, source="command-line flags")
        data = merge(data, layer)
    if overrides:
        layer = nest(dict(parse_override(o) for o in overrides))
        from_dict(cls, layer, source="command-line overrides")
        data = merge(data, layer)
    cfg = from_dict(cls, data, source=str(file) if file else "command line")
    validate = getattr(cfg, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as e:
            where = f" (config: {file})" if file else ""
            raise ConfigError(f"{e}{where}") from None
    return cfg


def dump_yaml(cfg: Any, path: str | Path, *, header: str | None = None) -> None:
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if header:
        text = "".join(f"# {line}\n" for line in header.splitlines()) + text
    Path(path).write_text(text)


def replace(cfg: T, **changes: Any) -> T:
    return dataclasses.replace(cfg, **changes)


# --------------------------------------------------------------------------------------------------------------
# The sections shared by commands. Sizes are (H, W), as everywhere in torch.
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    name: str = "tiny"
    weights: str | None = None  # local path only: our checkpoint, a Hugging Face folder, a torchvision state dict
    options: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of the model builder

    def validate(self, prefix: str = "model") -> None:
        from sfdaseg.models import MODELS

        if self.name not in MODELS:
            raise ConfigError(
                f"{prefix}.name: unknown model '{self.name}'; choices: {', '.join(MODELS)}."
                f"{_suggest(self.name, list(MODELS))}"
            )
        if self.weights is not None and not Path(self.weights).exists():
            raise ConfigError(f"{prefix}.weights: no such file or folder: {self.weights}")
        from sfdaseg.models import model_options

        accepted = model_options(self.name)
        unknown = sorted(set(self.options) - set(accepted))
        if unknown:
            raise ConfigError(
                f"{prefix}.options: model '{self.name}' has no option(s) {', '.join(unknown)}; its options: "
                + ", ".join(f"{k} (default {v!r})" for k, v in accepted.items())
                + _suggest(unknown[0], list(accepted))
            )


@dataclass
class DataConfig:
    train: str = "synthetic:source:train"  # KIND:ROOT[:SPLIT]
    val: str | None = "synthetic:source:val"
    resize: tuple[int, int] | None = None  # (H, W) before random scale / crop; None keeps the native size
    scale_range: tuple[float, float] = (0.75, 1.5)
    crop: tuple[int, int] | None = None  # (H, W) random crop; None keeps the whole (resized) image
    hflip: bool = True
    photometric: bool = True
    batch_size: int = 8  # per process
    num_workers: int = 2
    val_resize: tuple[int, int] | None = None  # (H, W) of the image fed to the model; labels keep their size
    val_batch_size: int = 4
    on_error: str = choices("raise", "skip", default="raise", help="bad files: stop, or skip with a warning")
    synthetic: dict[str, Any] = field(default_factory=dict)  # options of the built-in benchmark (size, length, seed)

    def validate(self) -> None:
        _check_dataset_specs("data", train=self.train, val=self.val)
        _positive("data.batch_size", self.batch_size)
        _positive("data.val_batch_size", self.val_batch_size)
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers: expected >= 0, got {self.num_workers}")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ConfigError(f"data.scale_range: expected 0 < min <= max, got {list(self.scale_range)}")
        for key in ("resize", "crop", "val_resize"):
            size = getattr(self, key)
            if size is not None and min(size) <= 0:
                raise ConfigError(f"data.{key}: expected positive (H, W), got {list(size)}")


@dataclass
class OptimConfig:
    name: str = choices("sgd", "adamw", default="adamw")
    lr: float = 1e-3
    momentum: float = 0.9  # SGD
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW
    weight_decay: float = 1e-4
    head_lr_mult: float = 10.0  # DAFormer/SegFormer convention: the decoder learns 10x faster
    no_decay_norm_bias: bool = True  # no weight decay on norm weights and biases (1-D parameters)
    warmup_iters: int = 0
    warmup_ratio: float = 1e-6  # LR at step 0 = lr * warmup_ratio, rising linearly to lr
    poly_power: float = 0.9
    min_lr: float = 0.0
    grad_clip: float | None = None  # max global grad norm; None: no clipping
    fused: bool = False  # fused optimizer kernels (CUDA only)

    def validate(self) -> None:
        _positive("optim.lr", self.lr)
        if self.weight_decay < 0 or self.warmup_iters < 0 or self.poly_power < 0:
            raise ConfigError("optim.weight_decay, optim.warmup_iters and optim.poly_power must be >= 0")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"optim.grad_clip: expected a positive norm or null, got {self.grad_clip}")


@dataclass
class TrainConfig:
    iters: int = 1000
    accumulate: int = 1  # micro-batches per optimizer step
    amp: str = choices("fp32", "bf16", "fp16", default="fp32")
    channels_last: bool = False
    sync_bn: bool = False  # SyncBatchNorm under DDP
    compile: bool = False  # torch.compile the trainable models
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    log_every: int = 20
    ckpt_every: int = 500
    eval_every: int = 0  # 0: evaluate at the end only
    out: str = "runs/train"
    resume: bool = False
    on_nan: str = choices("stop", "skip", default="stop", help="non-finite loss: stop (keep last checkpoint) or skip the step")
    progress: bool = True
    tensorboard: bool = True

    def validate(self) -> None:
        if self.iters <= 0:
            raise ConfigError(f"train.iters: expected a positive number of iterations, got {self.iters}")
        _positive("train.accumulate", self.accumulate)
        _positive("train.log_every", self.log_every)
        _positive("train.ckpt_every", self.ckpt_every)
        if self.eval_every < 0:
            raise ConfigError(f"train.eval_every: expected >= 0, got {self.eval_every}")


@dataclass
class EvalConfig:
    protocol: int | None = None  # 19 / 16 / 13 (subsets of the Cityscapes trainIds); None: all model classes
    mode: str = choices("whole", "slide", default="whole")
    crop: tuple[int, int] | None = None  # sliding window (H, W)
    stride: tuple[int, int] | None = None
    flip: bool = False
    scales: tuple[float, ...] = (1.0,)
    amp: str = choices("fp32", "bf16", "fp16", default="fp32")

    def validate(self) -> None:
        from sfdaseg.data.classes import PROTOCOLS

        if self.protocol is not None and self.protocol not in PROTOCOLS:
            raise ConfigError(f"eval.protocol: expected one of {', '.join(map(str, PROTOCOLS))} or null, got {self.protocol}")
        if self.mode == "slide" and (self.crop is None or self.stride is None):
            raise ConfigError("eval.crop and eval.stride: both are needed for eval.mode=slide, e.g. eval.crop=[512,512] eval.stride=[341,341]")
        if not self.scales or min(self.scales) <= 0:
            raise ConfigError(f"eval.scales: expected positive scales, got {list(self.scales)}")


def _check_dataset_specs(prefix: str, **specs: str | None) -> None:
    """Each ``KIND:ROOT[:SPLIT]`` parses (the kind is known); errors name the key."""
    from sfdaseg.data.datasets import parse_dataset_spec

    for key, spec in specs.items():
        if spec is not None:
            try:
                parse_dataset_spec(spec)
            except ValueError as e:
                raise ConfigError(f"{prefix + '.' if prefix else ''}{key}: {e}") from None


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{key}: expected a positive value, got {value}")


def validate_sections(cfg: Any) -> None:
    """Call ``validate()`` of every section that has one."""
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        fn = getattr(v, "validate", None)
        if is_dataclass(v) and fn is not None:
            try:
                fn()
            except ConfigError:
                raise
            except ValueError as e:
                raise ConfigError(f"{f.name}: {e}") from None


# --------------------------------------------------------------------------------------------------------------
# One config per command.
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TrainSourceConfig:
    """``sfdaseg train-source``: supervised training on a labelled dataset."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        validate_sections(self)


@dataclass
class EvaluateConfig:
    """``sfdaseg evaluate``: mIoU of a checkpoint on a labelled split."""

    checkpoint: str = ""
    data: str = "synthetic:target:val"
    resize: tuple[int, int] | None = None  # (H, W) of the model input; labels keep their size
    batch_size: int = 4
    num_workers: int = 2
    device: str = "auto"
    json: str | None = None
    on_error: str = choices("raise", "skip", default="raise")
    synthetic: dict[str, Any] = field(default_factory=dict)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cost: bool = True  # also report params, GFLOPs and latency of one forward at the evaluation size

    def validate(self) -> None:
        if not self.checkpoint:
            raise ConfigError("checkpoint: required (--checkpoint PATH or checkpoint=PATH)")
        if not Path(self.checkpoint).is_file():
            raise ConfigError(f"checkpoint: no such file: {self.checkpoint}")
        _check_dataset_specs("", data=self.data)
        _positive("batch_size", self.batch_size)
        self.eval.validate()


@dataclass
class PredictConfig:
    """``sfdaseg predict``: class-index PNGs, colour masks and overlays for every image under a folder."""

    checkpoint: str = ""  # an sfdaseg checkpoint (.pt / .safetensors) or an ONNX file written by `sfdaseg export`
    images: str = ""  # a folder (searched recursively) or one image file
    out: str = "predictions"  # labels/, color/, overlay/ (and confidence/, entropy/) mirror the input tree
    device: str = "auto"  # auto | cpu | cuda | cuda:N (ONNX: the CUDA execution provider when available)
    batch_size: int = 4  # images of the same size per forward pass
    num_workers: int = 2  # image-decoding processes
    mode: str = choices("auto", "whole", "slide", default="auto",
                        help="auto: sliding window for images whose longer side exceeds slide_above")
    slide_above: int = 2048  # mode=auto: longer image side (pixels) above which the sliding window is used
    crop: tuple[int, int] = (1024, 1024)  # sliding window (H, W)
    stride: tuple[int, int] | None = None  # window step (H, W); None: two thirds of the crop
    flip: bool = False  # also predict the mirrored image and average the probabilities
    amp: str = choices("fp32", "bf16", "fp16", default="fp32")  # PyTorch checkpoints only
    ids: str = choices("class", "trainid", "labelid", default="class",
                       help="class-index PNG values: the model's class indices, Cityscapes trainIds or labelIds")
    protocol: int | None = None  # colours of a 16/13-class model whose class spec has no palette
    color: bool = True  # write color/ (the class palette)
    overlay: bool = True  # write overlay/ (the colour mask blended over the image)
    overlay_format: str = choices("jpg", "png", default="jpg")
    alpha: float = 0.5  # opacity of the colour mask in the overlay
    confidence: bool = False  # write confidence/: the top class probability, 0..255
    entropy: bool = False  # write entropy/: the prediction entropy / log(C), 0..255
    on_error: str = choices("raise", "skip", default="raise", help="unreadable images: stop, or skip with a warning")
    progress: bool = True

    def validate(self) -> None:
        from sfdaseg.data.classes import PROTOCOLS

        if not self.checkpoint:
            raise ConfigError("checkpoint: required (--checkpoint PATH or checkpoint=PATH): a checkpoint or an ONNX file")
        if not Path(self.checkpoint).expanduser().is_file():
            raise ConfigError(f"checkpoint: no such file: {self.checkpoint}")
        if not self.images:
            raise ConfigError("images: required (--images DIR or images=DIR): a folder of images")
        if not Path(self.images).expanduser().exists():
            raise ConfigError(f"images: no such folder or file: {self.images}")
        _positive("batch_size", self.batch_size)
        _positive("slide_above", self.slide_above)
        if self.num_workers < 0:
            raise ConfigError(f"num_workers: expected >= 0, got {self.num_workers}")
        if min(self.crop) <= 0:
            raise ConfigError(f"crop: expected a positive (H, W), got {list(self.crop)}")
        if self.stride is not None and (min(self.stride) <= 0 or self.stride[0] > self.crop[0]
                                        or self.stride[1] > self.crop[1]):
            raise ConfigError(f"stride: expected a positive (H, W) no larger than the crop {list(self.crop)} "
                              f"(windows would leave gaps), got {list(self.stride)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha: expected an opacity in [0, 1], got {self.alpha}")
        if self.protocol is not None and self.protocol not in PROTOCOLS:
            raise ConfigError(f"protocol: expected one of {', '.join(map(str, PROTOCOLS))} or null, got {self.protocol}")


@dataclass
class ExportConfig:
    """``sfdaseg export``: an ONNX graph (0..1 RGB NCHW -> logits at input size), checked with onnxruntime."""

    checkpoint: str = ""
    out: str = "model.onnx"
    size: tuple[int, int] = (512, 512)  # (H, W) traced and checked; the input size of a fixed-size export
    dynamic: bool = True  # dynamic image height/width (falls back to `size` when the model cannot); batch always
    opset: int = 17
    tolerance: float = 1e-3  # largest accepted |onnxruntime - PyTorch| logit difference on random inputs
    check: bool = True  # compare with PyTorch in onnxruntime (the file is only written when it passes)
    exporter: str = choices("auto", "torchscript", "dynamo", default="auto",
                            help="torch.onnx exporter: auto = TorchScript-based (needs no onnxscript), else dynamo")

    def validate(self) -> None:
        if not self.checkpoint:
            raise ConfigError("checkpoint: required (--checkpoint PATH or checkpoint=PATH)")
        if not Path(self.checkpoint).expanduser().is_file():
            raise ConfigError(f"checkpoint: no such file: {self.checkpoint}")
        if Path(self.checkpoint).suffix.lower() == ".onnx":
            raise ConfigError(f"checkpoint: {self.checkpoint} is already an ONNX file; export reads sfdaseg checkpoints")
        if Path(self.out).suffix.lower() != ".onnx":
            raise ConfigError(f"out: expected a file name ending in .onnx, got {self.out}")
        if min(self.size) < 8:
            raise ConfigError(f"size: expected (H, W) of at least 8 pixels each, got {list(self.size)}")
        if self.opset < 17:
            raise ConfigError(f"opset: expected 17 or newer, got {self.opset}")
        _positive("tolerance", self.tolerance)


@dataclass
class BenchConfig:
    """``sfdaseg bench``: recipes x seeds on one benchmark, one markdown + JSON table.

    Built-in benchmark by default; for real data give ``source_checkpoint`` (or a labelled ``source`` to train
    one), the unlabelled ``target`` and a labelled ``val`` (used only to score the final models and snapshots).
    """

    recipes: list[str] = field(default_factory=lambda: ["selftrain", "stvm", "diga_sf", "sfda_liu"])
    seeds: int = 3
    ablations: bool = False  # add one row per removed part of each recipe (``ablation_seeds`` seeds)
    ablation_seeds: int = 1
    variants: dict[str, list[str]] = field(default_factory=dict)  # extra rows: name -> [recipe, overrides...]
    out: str = "runs/bench"
    source: str = "synthetic:source:train"  # labelled source data, to train the source model if none is given
    source_checkpoint: str = ""
    source_config: str = "configs/source/synthetic_tiny.yaml"
    source_iters: int = 1000
    target: str = "synthetic:target:train"  # unlabelled: only its images are read during adaptation
    val: str = "synthetic:target:val"  # labelled target split: scores the results, never picks a checkpoint
    val_extra: list[str] = field(default_factory=lambda: ["synthetic:shift:val"])  # held-out domains
    oracle: str = "synthetic:target:train"  # labelled target *training* data for the oracle row; "" skips it
    oracle_checkpoint: str = ""
    adapt_config: str = "configs/adapt/{recipe}_synthetic.yaml"  # per-recipe base config; "" = recipe defaults
    adapt_iters: int = 400
    overrides: list[str] = field(default_factory=list)  # applied to every adaptation run (e.g. data.batch_size=4)
    recipe_overrides: dict[str, list[str]] = field(default_factory=dict)  # recipe -> overrides for its runs only
    snapshots: int = 4  # checkpoints per run kept for ranking the label-free signals (0: final only)
    synthetic: dict[str, Any] = field(default_factory=lambda: {"size": [128, 256]})
    val_length: int = 200  # built-in benchmark: images per val split
    device: str = "auto"

    def validate(self) -> None:
        from sfdaseg.methods import RECIPES

        _positive("seeds", self.seeds)
        _positive("adapt_iters", self.adapt_iters)
        if self.ablation_seeds < 0 or self.snapshots < 0:
            raise ConfigError("ablation_seeds and snapshots: expected >= 0")
        for r in self.recipes:
            if r not in RECIPES:
                raise ConfigError(f"recipes: unknown recipe '{r}'; choices: {', '.join(RECIPES)}."
                                  f"{_suggest(r, list(RECIPES))}")
        for name, spec in self.variants.items():
            if not spec or spec[0] not in RECIPES:
                raise ConfigError(f"variants.{name}: expected [recipe, overrides...] with a recipe among "
                                  f"{', '.join(RECIPES)}, got {spec}")
        if not self.source_checkpoint and not self.source:
            raise ConfigError("source_checkpoint or source: one is needed to get a source model")
        if self.source_checkpoint and not Path(self.source_checkpoint).is_file():
            raise ConfigError(f"source_checkpoint: no such file: {self.source_checkpoint}")
        if self.oracle_checkpoint and not Path(self.oracle_checkpoint).is_file():
            raise ConfigError(f"oracle_checkpoint: no such file: {self.oracle_checkpoint}")
        _check_dataset_specs("", target=self.target, val=self.val)


@dataclass
class DemoConfig:
    """``sfdaseg demo``: the whole story on the built-in benchmark, on a CPU in minutes."""

    out: str = "runs/demo"
    quick: bool = False  # a much shorter run, for a smoke test
    model: str = "tiny"
    recipe: str = "selftrain"  # the adaptation recipe the demo runs (its settings: sfdaseg.runs.demo.DEMO_RECIPES)
    iters: int = 1000  # source and oracle training
    adapt_iters: int = 400
    batch_size: int = 8
    size: tuple[int, int] = (128, 256)  # (H, W) of the built-in benchmark
    train_length: int = 1000
    val_length: int = 200
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        from sfdaseg.methods import RECIPES

        _positive("iters", self.iters)
        _positive("adapt_iters", self.adapt_iters)
        _positive("batch_size", self.batch_size)
        if self.recipe not in RECIPES:
            raise ConfigError(f"recipe: unknown recipe '{self.recipe}'; choices: {', '.join(RECIPES)}."
                              f"{_suggest(self.recipe, list(RECIPES))}")


@dataclass
class AdaptDataConfig:
    target: str = "synthetic:target:train"  # unlabelled target images: labels are never opened
    val: str | None = None  # labelled target split, for evaluation at the end only (never for training or selection)
    val_extra: list[str] = field(default_factory=list)  # more labelled splits evaluated at the end (e.g. a shift domain)
    resize: tuple[int, int] | None = None  # (H, W) before random scale / crop
    scale_range: tuple[float, float] = (0.75, 1.5)
    crop: tuple[int, int] | None = None
    hflip: bool = True
    batch_size: int = 4
    num_workers: int = 2
    cache_dir: str | None = None  # offline pseudo-label cache; None: $SFDASEG_CACHE or ~/.cache/sfdaseg
    val_resize: tuple[int, int] | None = None
    val_batch_size: int = 4
    on_error: str = choices("raise", "skip", default="raise")
    synthetic: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        _check_dataset_specs("data", target=self.target, val=self.val,
                             **{f"val_extra[{i}]": s for i, s in enumerate(self.val_extra)})
        _positive("data.batch_size", self.batch_size)
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ConfigError(f"data.scale_range: expected 0 < min <= max, got {list(self.scale_range)}")


@dataclass
class MonitorConfig:
    """Target-only signals logged during adaptation (``sfdaseg.selection``): no label is read."""

    every: int = 0  # steps between measurements; 0: at the start and the end only; -1: never
    images: int = 32  # a fixed sample of target images (the first ones of the target set, un-augmented)
    batch_size: int = 8
    tau: float = 0.968  # confidence threshold behind kept_frac
    snd_pixels: int = 1024  # pixels sampled per batch for SND
    keep_checkpoints: bool = False  # keep snapshots/step_N.ckpt at every measurement (checkpoint choice)

    def validate(self) -> None:
        if self.every < -1:
            raise ConfigError(f"monitor.every: expected >= -1, got {self.every}")
        _positive("monitor.images", self.images)
        _positive("monitor.batch_size", self.batch_size)
        _positive("monitor.snd_pixels", self.snd_pixels)
        if not 0 < self.tau <= 1:
            raise ConfigError(f"monitor.tau: expected a probability in (0, 1], got {self.tau}")


@dataclass
class PipelineAuxConfig:
    """One auxiliary model of a multi-stage run (an item of ``stages.aux``): stage 1 adapts it in OUT/stage1_<name>."""

    name: str = ""  # the stage folder's suffix: letters, digits, '_' and '-'
    checkpoint: str = ""  # its source model (any registered architecture)
    overrides: list[str] = field(default_factory=list)  # key=value overrides of this stage's adapt config


@dataclass
class PipelineEnsembleConfig:
    """Cross-model transfer (``stages.ensemble``): the adapted auxiliary models label the target images together."""

    mc_passes: int = 8  # MC-dropout passes of each model's classifier (0: one deterministic pass, softmax entropy)
    measure: str = choices("entropy", "variance", default="entropy",
                           help="the MC-dropout statistic behind a model's certainty")
    weighting: str = choices("certainty", "uniform", default="certainty",
                             help="per-pixel model weights: normalised certainties, or a plain average")
    batch_size: int | None = None  # images per labelling batch; None: data.val_batch_size


@dataclass
class PipelineStudentConfig:
    """Stage 2 (``stages.student``): the efficient model (``checkpoint``) learns from the ensemble's labels."""

    overrides: list[str] = field(default_factory=list)  # key=value overrides of this stage's adapt config


# Set by the pipeline for every stage: a stage's overrides may not change them.
_PIPELINE_FIXED_KEYS = ("recipe", "checkpoint", "stages", "train.out", "train.resume")


def _check_stage_overrides(key: str, overrides: Sequence[str]) -> None:
    for o in overrides:
        name, _ = parse_override(o)
        if name in _PIPELINE_FIXED_KEYS or name.startswith("stages."):
            raise ConfigError(f"{key}: {o!r} sets {name}, which the pipeline sets for every stage "
                              f"({', '.join(_PIPELINE_FIXED_KEYS)} are fixed)")


@dataclass
class PipelineConfig:
    """The ``stages`` section of an adapt config: a multi-stage UniSFDA run (see ``sfdaseg.runs.pipeline``)."""

    aux: list[dict[str, Any]] = field(default_factory=list)  # one {name, checkpoint, overrides} per auxiliary model
    ensemble: PipelineEnsembleConfig = field(default_factory=PipelineEnsembleConfig)
    student: PipelineStudentConfig = field(default_factory=PipelineStudentConfig)

    def aux_configs(self) -> list[PipelineAuxConfig]:
        return [from_dict(PipelineAuxConfig, a, source="the config", prefix=f"stages.aux[{i}].")
                for i, a in enumerate(self.aux)]

    def validate(self) -> None:
        auxes = self.aux_configs()
        if not auxes:
            raise ConfigError("stages.aux: expected at least one auxiliary model, e.g. [{name: a, checkpoint: a.ckpt}]")
        seen: set[str] = set()
        for i, a in enumerate(auxes):
            key = f"stages.aux[{i}]"
            if not a.name or not a.name.replace("_", "").replace("-", "").isalnum():
                raise ConfigError(f"{key}.name: expected a folder name of letters, digits, '_' and '-', got {a.name!r}")
            if a.name in seen:
                raise ConfigError(f"{key}.name: {a.name!r} is used twice (each auxiliary model gets its own folder)")
            seen.add(a.name)
            if not a.checkpoint:
                raise ConfigError(f"{key}.checkpoint: required (the auxiliary model's source checkpoint)")
            _check_stage_overrides(f"{key}.overrides", a.overrides)
        _check_stage_overrides("stages.student.overrides", self.student.overrides)
        if self.ensemble.mc_passes < 0:
            raise ConfigError(f"stages.ensemble.mc_passes: expected >= 0, got {self.ensemble.mc_passes}")
        if self.ensemble.batch_size is not None:
            _positive("stages.ensemble.batch_size", self.ensemble.batch_size)


@dataclass
class AdaptConfig:
    """``sfdaseg adapt``: source-free adaptation of a source checkpoint to unlabelled target images."""

    recipe: str = "selftrain"
    checkpoint: str = ""  # the source model (an sfdaseg checkpoint)
    export: str = choices("teacher", "student", default="teacher",
                          help="which model the run delivers (recipes without a teacher deliver the student)")
    method: dict[str, Any] = field(default_factory=dict)  # the recipe's hyper-parameters (checked by the recipe)
    # Non-empty: a multi-stage UniSFDA run (PipelineConfig; `checkpoint` is then the final, efficient model's source).
    stages: dict[str, Any] = field(default_factory=dict)
    data: AdaptDataConfig = field(default_factory=AdaptDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=6e-5, weight_decay=0.01))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out="runs/adapt"))
    eval: EvalConfig = field(default_factory=EvalConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    report: bool = True  # RUN/report.md + report.html: curves, signals, before/after, example predictions

    def validate(self) -> None:
        from sfdaseg.methods import RECIPES

        if self.recipe not in RECIPES:
            raise ConfigError(f"recipe: unknown recipe '{self.recipe}'; choices: {', '.join(RECIPES)}."
                              f"{_suggest(self.recipe, list(RECIPES))}")
        if not self.checkpoint:
            raise ConfigError("checkpoint: required (--checkpoint PATH or checkpoint=PATH): the source model")
        if not Path(self.checkpoint).is_file():
            raise ConfigError(f"checkpoint: no such file: {self.checkpoint}")
        from_dict(RECIPES[self.recipe].config_cls, self.method, source="the config", prefix="method.")
        if self.stages:
            if self.recipe != "unisfda":
                raise ConfigError(f"stages: a multi-stage run uses recipe unisfda, got recipe={self.recipe!r}")
            self.pipeline_config()
        validate_sections(self)

    def method_config(self) -> Any:
        from sfdaseg.methods import RECIPES

        cfg = from_dict(RECIPES[self.recipe].config_cls, self.method, source="the config", prefix="method.")
        if hasattr(cfg, "validate"):
            cfg.validate()
        return cfg

    def pipeline_config(self) -> PipelineConfig:
        """The typed, validated ``stages`` section."""
        cfg = from_dict(PipelineConfig, self.stages, source="the config", prefix="stages.")
        cfg.validate()
        return cfg


@dataclass
class DistillConfig:
    """``sfdaseg distill``: distil 1..N frozen adapted teachers into one student on unlabelled target images.

    The student is ``model`` (random initialisation) or ``student_checkpoint`` (e.g. a small source model; its
    architecture unless ``model`` says otherwise, for a foreign weights file). Loss: ``kd_weight * T^2 *
    KL(mean of the teachers' softmax at T || student at T) + ce_weight * CE(student, argmax of the mean softmax)``.
    """

    teachers: list[str] = field(default_factory=list)  # adapted checkpoints, frozen; their softmax is averaged
    model: str | None = None  # student architecture; None: that of student_checkpoint
    model_options: dict[str, Any] = field(default_factory=dict)  # student builder options, e.g. {width: 8}
    student_checkpoint: str | None = None  # initial student weights (local file); None: random initialisation
    temperature: float = 2.0  # T of the KL term (T^2-scaled)
    kd_weight: float = 1.0
    ce_weight: float = 0.0  # CE on the teachers' averaged hard labels
    photometric: bool = False  # perturb the student's view (the teachers see the clean one)
    data: AdaptDataConfig = field(default_factory=AdaptDataConfig)  # target (unlabelled), val (at the end only)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=0.01))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out="runs/distill"))
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        from sfdaseg.models import MODELS

        if not self.teachers:
            raise ConfigError("teachers: required (--teachers CKPT[,CKPT] or teachers=[...]): adapted checkpoints")
        for i, t in enumerate(self.teachers):
            if not Path(t).is_file():
                raise ConfigError(f"teachers[{i}]: no such file: {t}")
        if self.model is None and not self.student_checkpoint:
            raise ConfigError("model: required (--model NAME), unless --student-checkpoint gives the student")
        if self.model is not None and self.model not in MODELS:
            raise ConfigError(f"model: unknown model '{self.model}'; choices: {', '.join(MODELS)}."
                              f"{_suggest(self.model, list(MODELS))}")
        if self.student_checkpoint and not Path(self.student_checkpoint).is_file():
            raise ConfigError(f"student_checkpoint: no such file: {self.student_checkpoint}")
        _positive("temperature", self.temperature)
        if self.kd_weight < 0 or self.ce_weight < 0 or self.kd_weight + self.ce_weight == 0:
            raise ConfigError(f"kd_weight, ce_weight: expected >= 0 and not both 0, got {self.kd_weight}, "
                              f"{self.ce_weight}")
        validate_sections(self)
