"""The configs of the commands: one typed dataclass per command, built from shared sections.

The generic machinery (YAML + ``key=value`` layers, type checks, choices, loader-side validation) is the leaf
module :mod:`sfdaseg.config_base`; its names are re-exported here for the code above this layer. Every section's
``validate()`` is called by the loader (:func:`load_config`), once, innermost first; a command config's own
``validate()`` checks what spans sections (the recipe's ``method:`` section against the recipe's config class).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from sfdaseg.config_base import (ConfigError, choices, from_dict, load_config, load_yaml, merge, nest,
                                 parse_override, positive, suggest, to_dict, to_yaml, validate_tree)
from sfdaseg.data.classes import PROTOCOLS
from sfdaseg.data.datasets import parse_dataset_spec
from sfdaseg.methods import RECIPES, get_recipe
from sfdaseg.models import MODELS, model_options

__all__ = [
    "AdaptConfig", "AdaptDataConfig", "BenchConfig", "ConfigError", "DataConfig", "DemoConfig", "DistillConfig",
    "EvalConfig", "EvaluateConfig", "ExportConfig", "LossConfig", "ModelConfig", "MonitorConfig", "OptimConfig",
    "PipelineConfig", "PredictConfig", "TrainConfig", "TrainSourceConfig", "choices", "from_dict",
    "load_config", "load_yaml", "merge", "nest", "parse_override", "to_dict", "to_yaml", "validate_tree",
]


# --------------------------------------------------------------------------------------------------------------
# The sections shared by commands. Sizes are (H, W), as everywhere in torch.
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    name: str = "tiny"
    weights: str | None = None  # local path only: our checkpoint, a Hugging Face folder, a torchvision state dict
    options: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of the model builder
    aux_head: bool = False  # an auxiliary (deep-supervision) FCN head on an intermediate stage, loss.aux_weight

    def validate(self, prefix: str = "model") -> None:
        if self.name not in MODELS:
            raise ConfigError(
                f"{prefix}.name: unknown model '{self.name}'; choices: {', '.join(MODELS)}."
                f"{suggest(self.name, list(MODELS))}"
            )
        if self.weights is not None and not Path(self.weights).exists():
            raise ConfigError(f"{prefix}.weights: no such file or folder: {self.weights}")
        accepted = model_options(self.name)
        unknown = sorted(set(self.options) - set(accepted))
        if unknown:
            raise ConfigError(
                f"{prefix}.options: model '{self.name}' has no option(s) {', '.join(unknown)}; its options: "
                + ", ".join(f"{k} (default {v!r})" for k, v in accepted.items())
                + suggest(unknown[0], list(accepted))
            )
        if self.aux_head and "aux_head" not in accepted:
            raise ConfigError(f"{prefix}.aux_head: model '{self.name}' has no auxiliary head (its decoder already "
                              "reads every encoder stage); models with one: "
                              + ", ".join(m for m in MODELS if "aux_head" in model_options(m)))


@dataclass
class DataConfig:
    train: str = "synthetic:source:train"  # KIND:ROOT[:SPLIT]
    val: str | None = "auto"  # labelled val split; auto: the built-in benchmark's own val split, else none
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
    check_labels: bool = True  # read every training mask once first: class frequencies, masks with no label

    def validate(self) -> None:
        _check_dataset_specs("data", train=self.train, val=self.val_split())
        positive("data.batch_size", self.batch_size)
        positive("data.val_batch_size", self.val_batch_size)
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers: expected >= 0, got {self.num_workers}")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ConfigError(f"data.scale_range: expected 0 < min <= max, got {list(self.scale_range)}")
        for key in ("resize", "crop", "val_resize"):
            size = getattr(self, key)
            if size is not None and min(size) <= 0:
                raise ConfigError(f"data.{key}: expected positive (H, W), got {list(size)}")

    def val_split(self) -> str | None:
        """``val``, with ``auto`` resolved: ``synthetic:DOMAIN:val`` for the built-in benchmark, else none."""
        if self.val != "auto":
            return self.val
        kind, _, rest = self.train.partition(":")
        return f"synthetic:{rest.split(':')[0]}:val" if kind.strip().lower() == "synthetic" else None


CLASS_WEIGHT_MODES = ("auto", "log")  # weights from the label histogram


@dataclass
class LossConfig:
    """The supervised loss of ``train-source``: cross-entropy with the tools for imbalanced classes."""

    # per-class CE weights, or from the training labels' histogram: auto (inverse class frequency) or log
    # (ENet's 1 / ln(1.02 + f), bounded, for a dominant background)
    class_weight: list[float] | str | None = None
    ohem: bool = False  # online hard example mining: the hardest pixels only (mmsegmentation's OHEM)
    ohem_thresh: float = 0.7  # a pixel is hard when its true class's probability is below this
    ohem_min_kept: int | None = None  # hardest pixels kept at least, per batch; null: a fifth of its pixels
    aux_weight: float = 0.4  # weight of the auxiliary head's CE (model.aux_head=true)

    def validate(self) -> None:
        cw = self.class_weight
        if isinstance(cw, str) and cw not in CLASS_WEIGHT_MODES:
            raise ConfigError(f"loss.class_weight: expected a list of weights (one per class), "
                              f"{' | '.join(CLASS_WEIGHT_MODES)} or null, got {cw!r}")
        if isinstance(cw, list) and (not cw or min(cw) < 0):
            raise ConfigError(f"loss.class_weight: expected a non-empty list of weights >= 0, got {cw}")
        if not 0.0 < self.ohem_thresh <= 1.0:
            raise ConfigError(f"loss.ohem_thresh: expected a probability in (0, 1], got {self.ohem_thresh}")
        if self.ohem_min_kept is not None:
            positive("loss.ohem_min_kept", self.ohem_min_kept)
        if self.aux_weight < 0:
            raise ConfigError(f"loss.aux_weight: expected a weight >= 0, got {self.aux_weight}")


@dataclass
class OptimConfig:
    name: str = choices("sgd", "adamw", default="adamw")
    lr: float = 1e-3
    momentum: float = 0.9  # SGD
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW
    weight_decay: float = 1e-4
    # zero: decoupled weight decay towards 0 (AdamW). init: towards the weights the run started from (the source
    # model; L2-SP's target in decoupled form): each step moves every weight lr * weight_decay of its way back.
    decay_to: str = choices("zero", "init", default="zero",
                            help="what weight decay pulls the weights towards: 0, or the weights at the start of "
                                 "the run (the source model); with AdamW a weight then drifts at most about "
                                 "1/weight_decay from it, whatever the learning rate")
    head_lr_mult: float = 10.0  # DAFormer/SegFormer convention: the decoder learns 10x faster
    no_decay_norm_bias: bool = True  # no weight decay on norm weights and biases (1-D parameters)
    warmup_iters: int = 0
    warmup_ratio: float = 1e-6  # LR at step 0 = lr * warmup_ratio, rising linearly to lr
    poly_power: float = 0.9
    min_lr: float = 0.0
    grad_clip: float | None = None  # max global grad norm; None: no clipping
    fused: bool = False  # fused optimizer kernels (CUDA only)

    def validate(self) -> None:
        positive("optim.lr", self.lr)
        if self.weight_decay < 0 or self.warmup_iters < 0 or self.poly_power < 0:
            raise ConfigError("optim.weight_decay, optim.warmup_iters and optim.poly_power must be >= 0")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"optim.grad_clip: expected a positive norm or null, got {self.grad_clip}")
        if self.decay_to == "zero" and self.weight_decay >= 1.0:
            # adapt's default strength towards the source weights would wipe the model if it pulled towards 0.
            raise ConfigError(f"optim.weight_decay={self.weight_decay:g} with optim.decay_to=zero would shrink every "
                              "weight towards 0 by lr * weight_decay per step: expected < 1 (e.g. 0.01) when "
                              "decaying towards zero; set both keys")


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
        positive("train.accumulate", self.accumulate)
        positive("train.log_every", self.log_every)
        positive("train.ckpt_every", self.ckpt_every)
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
        if self.protocol is not None and self.protocol not in PROTOCOLS:
            raise ConfigError(f"eval.protocol: expected one of {', '.join(map(str, PROTOCOLS))} or null, got {self.protocol}")
        if self.mode == "slide" and (self.crop is None or self.stride is None):
            raise ConfigError("eval.crop and eval.stride: both are needed for eval.mode=slide, e.g. eval.crop=[512,512] eval.stride=[341,341]")
        if not self.scales or min(self.scales) <= 0:
            raise ConfigError(f"eval.scales: expected positive scales, got {list(self.scales)}")


def _check_dataset_specs(prefix: str, **specs: str | None) -> None:
    """Each ``KIND:ROOT[:SPLIT]`` parses (the kind is known); errors name the key."""
    for key, spec in specs.items():
        if spec is not None:
            try:
                parse_dataset_spec(spec)
            except ValueError as e:
                raise ConfigError(f"{prefix + '.' if prefix else ''}{key}: {e}") from None


# --------------------------------------------------------------------------------------------------------------
# One config per command.
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TrainSourceConfig:
    """``sfdaseg train-source``: supervised training on a labelled dataset."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


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
        positive("batch_size", self.batch_size)


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
        if not self.checkpoint:
            raise ConfigError("checkpoint: required (--checkpoint PATH or checkpoint=PATH): a checkpoint or an ONNX file")
        if not Path(self.checkpoint).expanduser().is_file():
            raise ConfigError(f"checkpoint: no such file: {self.checkpoint}")
        if not self.images:
            raise ConfigError("images: required (--images DIR or images=DIR): a folder of images")
        if not Path(self.images).expanduser().exists():
            raise ConfigError(f"images: no such folder or file: {self.images}")
        positive("batch_size", self.batch_size)
        positive("slide_above", self.slide_above)
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
        positive("tolerance", self.tolerance)


@dataclass
class BenchConfig:
    """``sfdaseg bench``: recipes x seeds on one benchmark, one markdown + JSON table.

    The protocol: every recipe at its shipped defaults (``adapt_config`` empty; ``overrides`` only say what the
    benchmark's data need, e.g. the crop), a fixed schedule and the final (or guard-chosen) checkpoint; settings
    are chosen on ``val``, every reported number is on ``test``. The built-in benchmark by default; any folder
    benchmark with ``source`` (labelled, to train the source model) or ``source_checkpoint``, the unlabelled
    ``target``, labelled ``val`` and ``test`` splits and, for the oracle row, labelled target training data
    (``oracle``).
    """

    recipes: list[str] = field(default_factory=lambda: list(RECIPES))
    seeds: int = 3
    ablations: bool = False  # add one row per removed part of each recipe (``ablation_seeds`` seeds)
    ablation_seeds: int = 1
    variants: dict[str, list[str]] = field(default_factory=dict)  # extra rows: name -> [recipe, overrides...]
    out: str = "runs/bench"
    source: str = "synthetic:source:train"  # labelled source data, to train the source model if none is given
    source_checkpoint: str = ""
    source_config: str = ""  # a train-source config for the source and oracle models; "" = its defaults
    source_overrides: list[str] = field(default_factory=list)  # key=value overrides of the source/oracle training
    source_iters: int = 1000
    target: str = "synthetic:target:train"  # unlabelled: only its images are read during adaptation
    val: str | None = "synthetic:target:val"  # labelled target split for choosing settings (scored, not the headline)
    test: str = "synthetic:target:test"  # labelled target split every reported number is measured on
    val_extra: list[str] = field(default_factory=lambda: ["synthetic:shift:val"])  # held-out domains
    oracle: str = "synthetic:target:train"  # labelled target *training* data for the oracle row; "" skips it
    oracle_checkpoint: str = ""
    adapt_config: str = ""  # a per-recipe base config ("{recipe}" is replaced); "" = the recipe's shipped defaults
    adapt_iters: int = 400
    overrides: list[str] = field(default_factory=list)  # applied to every adaptation run (e.g. data.batch_size=4)
    recipe_overrides: dict[str, list[str]] = field(default_factory=dict)  # recipe -> overrides for its runs only
    snapshots: int = 4  # checkpoints per run kept for ranking the label-free signals (0: final only)
    synthetic: dict[str, Any] = field(default_factory=lambda: {"size": [128, 256]})  # built-in benchmark options
    val_length: int = 200  # built-in benchmark: images per val and test split
    device: str = "auto"

    def validate(self) -> None:
        positive("seeds", self.seeds)
        positive("adapt_iters", self.adapt_iters)
        positive("source_iters", self.source_iters)
        positive("val_length", self.val_length)
        if self.ablation_seeds < 0 or self.snapshots < 0:
            raise ConfigError(f"ablation_seeds, snapshots: expected >= 0, got {self.ablation_seeds}, {self.snapshots}")
        if not self.recipes and not self.variants:
            raise ConfigError("recipes: expected at least one recipe (or a variant)")
        for r in self.recipes:
            get_recipe(r, key="recipes")
        for name, spec in self.variants.items():
            if not spec or spec[0] not in RECIPES:
                raise ConfigError(f"variants.{name}: expected [recipe, overrides...] with a recipe among "
                                  f"{', '.join(RECIPES)}, got {spec}")
        if not self.source_checkpoint and not self.source:
            raise ConfigError("source_checkpoint or source: one is needed to get a source model")
        for key in ("source_checkpoint", "oracle_checkpoint"):
            if getattr(self, key) and not Path(getattr(self, key)).is_file():
                raise ConfigError(f"{key}: no such file: {getattr(self, key)}")
        if self.source_config and not Path(self.source_config).is_file():
            raise ConfigError(f"source_config: no such file: {self.source_config}")
        if not self.test:
            raise ConfigError("test: required: the labelled target split every reported number is measured on")
        _check_dataset_specs("", target=self.target, val=self.val or None, test=self.test,
                             source=self.source or None, oracle=self.oracle or None,
                             **{f"val_extra[{i}]": v for i, v in enumerate(self.val_extra)})


@dataclass
class DemoConfig:
    """``sfdaseg demo``: the whole story on the built-in benchmark, on a CPU in tens of minutes."""

    out: str = "runs/demo"
    quick: bool = False  # a much shorter run, for a smoke test
    model: str = "tiny"
    recipe: str = "selftrain"  # the adaptation recipe the demo runs, at its shipped defaults
    iters: int = 1000  # source and oracle training
    adapt_iters: int = 400
    batch_size: int = 8
    size: tuple[int, int] = (128, 256)  # (H, W) of the built-in benchmark
    train_length: int = 1000
    val_length: int = 200
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        positive("iters", self.iters)
        positive("adapt_iters", self.adapt_iters)
        positive("batch_size", self.batch_size)
        get_recipe(self.recipe)


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
        positive("data.batch_size", self.batch_size)
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ConfigError(f"data.scale_range: expected 0 < min <= max, got {list(self.scale_range)}")


@dataclass
class MonitorConfig:
    """Target-only signals logged during adaptation (``sfdaseg.selection``) and the collapse guard: no label is read."""

    every: int | None = None  # steps between measurements; null: every 10% of the run; 0: start and end; -1: never
    on_collapse: str = choices("rollback", "stop", "warn", default="rollback",
                               help="on a collapse alarm: deliver the last healthy snapshot if the final model is "
                                    "flagged (rollback), stop and deliver it (stop), or only warn")
    rollback_to: str = choices("last_healthy", "source", default="last_healthy",
                               help="what a rollback or stop delivers: the last snapshot without an alarm, or the "
                                    "source model itself (step 0; the conservative choice)")
    images: int = 32  # a fixed sample of target images (the first ones of the target set, un-augmented)
    batch_size: int = 8
    tau: float = 0.968  # confidence threshold behind kept_frac
    snd_pixels: int = 1024  # pixels sampled per batch for SND
    keep_checkpoints: bool = False  # keep snapshots/step_N.ckpt at every measurement (checkpoint choice)

    def validate(self) -> None:
        if self.every is not None and self.every < -1:
            raise ConfigError(f"monitor.every: expected >= -1 or null (every 10% of the run), got {self.every}")
        positive("monitor.images", self.images)
        positive("monitor.batch_size", self.batch_size)
        positive("monitor.snd_pixels", self.snd_pixels)
        if not 0 < self.tau <= 1:
            raise ConfigError(f"monitor.tau: expected a probability in (0, 1], got {self.tau}")

    def interval(self, iters: int) -> int:
        """Steps between measurements for a run of ``iters`` steps (0: start and end only; -1: never)."""
        return max(1, iters // 10) if self.every is None else self.every


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
            positive("stages.ensemble.batch_size", self.ensemble.batch_size)


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
    # head_lr_mult 1: the source decoder is already trained, and a 10x head LR on pseudo-labels lets the
    # classifier chase its own errors (SHOT freezes it outright); new modules a recipe adds (STvM's metric
    # network, Liu et al.'s generator) have their own multipliers. lr 3e-5 (half of DAFormer's 6e-5): chosen on
    # both benchmarks' target val splits (benchmarks/results/tuning_val.md, round 4); self-training on a model
    # that is already trained drifts less per step, and the first harmful rate is then 3x away, not 1.7x.
    # decay_to=init, weight_decay 200: every step pulls each weight lr * 200 of its way back to the source model,
    # so with AdamW (steps of about lr) no weight settles further than ~1/200 from its source value whatever the
    # rate: a too-high LR then reaches that bound sooner instead of running away (self-training's collapse).
    # Chosen on both val splits (tuning_val.md, round 6): the best worst case over rates 3e-5..3e-4, head x1 and
    # x10, among the strengths within 1 point of the best default-rate score.
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-5, weight_decay=200.0, decay_to="init",
                                                                   head_lr_mult=1.0))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(out="runs/adapt"))
    eval: EvalConfig = field(default_factory=EvalConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    report: bool = True  # RUN/report.md + report.html: curves, signals, before/after, example predictions

    def validate(self) -> None:
        get_recipe(self.recipe)
        if not self.checkpoint:
            raise ConfigError("checkpoint: required (--checkpoint PATH or checkpoint=PATH): the source model")
        if not Path(self.checkpoint).is_file():
            raise ConfigError(f"checkpoint: no such file: {self.checkpoint}")
        self.method_config()
        if self.stages:
            if self.recipe != "unisfda":
                raise ConfigError(f"stages: a multi-stage run uses recipe unisfda, got recipe={self.recipe!r}")
            self.pipeline_config()

    def method_config(self) -> Any:
        """The typed ``method:`` section of the recipe (built and validated by the loader)."""
        return from_dict(get_recipe(self.recipe).config_cls, self.method, source="the config", prefix="method.")

    def pipeline_config(self) -> PipelineConfig:
        """The typed, validated ``stages`` section."""
        return from_dict(PipelineConfig, self.stages, source="the config", prefix="stages.")


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
        if not self.teachers:
            raise ConfigError("teachers: required (--teachers CKPT[,CKPT] or teachers=[...]): adapted checkpoints")
        for i, t in enumerate(self.teachers):
            if not Path(t).is_file():
                raise ConfigError(f"teachers[{i}]: no such file: {t}")
        if self.model is None and not self.student_checkpoint:
            raise ConfigError("model: required (--model NAME), unless --student-checkpoint gives the student")
        if self.model is not None and self.model not in MODELS:
            raise ConfigError(f"model: unknown model '{self.model}'; choices: {', '.join(MODELS)}."
                              f"{suggest(self.model, list(MODELS))}")
        if self.student_checkpoint and not Path(self.student_checkpoint).is_file():
            raise ConfigError(f"student_checkpoint: no such file: {self.student_checkpoint}")
        positive("temperature", self.temperature)
        if self.kd_weight < 0 or self.ce_weight < 0 or self.kd_weight + self.ce_weight == 0:
            raise ConfigError(f"kd_weight, ce_weight: expected >= 0 and not both 0, got {self.kd_weight}, "
                              f"{self.ce_weight}")
