"""The one training loop of sfdaseg.

Source training and every adaptation recipe run through :class:`Trainer`. A *task* (:class:`sfdaseg.task.Task`)
computes a loss; the trainer owns everything else: the data stream, backward, AMP, gradient accumulation and
clipping, the optimizer and LR schedule, DDP, checkpoints, resume, non-finite-loss handling and the metrics log.
AMP and DDP are switches, not subclasses. Validation, the label-free monitor, TensorBoard, the progress bar and
benchmark timers are hooks (:mod:`sfdaseg.engine.hooks`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from sfdaseg.amp import AMP_DTYPES
from sfdaseg.config import ConfigError, OptimConfig, TrainConfig
from sfdaseg.data.datasets import worker_died
from sfdaseg.engine.distributed import DistInfo, SeededDataset, StreamSampler, barrier, sample_seed
from sfdaseg.engine.hooks import HookBase, ProgressHook, TensorBoardHook
from sfdaseg.engine.rundir import trim_metrics
from sfdaseg.storage import CheckpointError, atomic_save, safe_load
from sfdaseg.task import StepOutput, Task

STATE_FILE = "state.pt"  # everything needed to resume
MODEL_FILE = "model.ckpt"  # the deliverable: a model checkpoint in the library's format

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------------------ optimizer


def build_param_groups(modules: Mapping[str, nn.Module], cfg: OptimConfig) -> list[dict[str, Any]]:
    """One group per (module, backbone|head, decay|no-decay); the head gets ``cfg.head_lr_mult``.

    A module may carry an ``lr_mult`` attribute (a float) that scales every group of its own on top of that: a
    generator or discriminator trained from scratch beside a fine-tuned model wants a larger step than the model.
    Each group records its ``lr_mult`` so the schedule scales every group from its own base LR.

    With ``cfg.decay_to == "init"`` every parameter of a module is pulled towards its starting value (group key
    ``decay_to_init``, applied by the :class:`Trainer` after each step; norm weights and biases too, since pulling
    them to their source values does not shrink them). A module a recipe builds from random weights (attribute
    ``from_scratch = True``: STvM's metric network, Liu et al.'s generator) has no value worth returning to and gets
    no weight decay then.
    """
    groups: list[dict[str, Any]] = []
    seen: set[int] = set()
    for mname, module in modules.items():
        # A SegmentationModel (and recipe modules such as a metric head) name their groups; anything else is one.
        parts = module.param_groups() if callable(getattr(module, "param_groups", None)) else \
            {"all": list(module.parameters())}
        for pname, params in parts.items():
            mult = (cfg.head_lr_mult if pname == "head" else 1.0) * float(getattr(module, "lr_mult", 1.0))
            to_init = cfg.decay_to == "init"
            decay, no_decay = [], []
            for p in params:
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                (no_decay if (to_init and getattr(module, "from_scratch", False))
                 or (not to_init and cfg.no_decay_norm_bias and p.ndim <= 1) else decay).append(p)
            for suffix, ps, wd in (("", decay, cfg.weight_decay), ("/no_decay", no_decay, 0.0)):
                if ps:
                    # The optimizer's own decay pulls towards 0; towards init the trainer applies it after the step.
                    groups.append({"params": ps, "lr": cfg.lr * mult, "lr_mult": mult,
                                   "weight_decay": 0.0 if to_init else wd, "decay_to_init": wd if to_init else 0.0,
                                   "name": f"{mname}/{pname}{suffix}"})
    if not groups:
        raise ValueError("the task has no trainable parameters")
    return groups


def build_optimizer(groups: list[dict[str, Any]], cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    fused = cfg.fused and device.type == "cuda"
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               fused=fused or None)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                             fused=fused or None)


def lr_factor(step: int, *, total: int, cfg: OptimConfig) -> float:
    """Poly decay ``(1 - t/T)^p`` towards ``min_lr`` with a linear warm-up from ``warmup_ratio``."""
    t = min(step, total)
    min_ratio = cfg.min_lr / cfg.lr
    factor = (1.0 - t / total) ** cfg.poly_power * (1.0 - min_ratio) + min_ratio
    if cfg.warmup_iters > 0 and step < cfg.warmup_iters:
        factor *= cfg.warmup_ratio + (1.0 - cfg.warmup_ratio) * step / cfg.warmup_iters
    return factor


# ------------------------------------------------------------------------------------------------ loop


class Trainer:
    """Runs ``train_cfg.iters`` optimizer steps of ``task`` on ``dataset``.

    Args:
        task: a :class:`sfdaseg.task.Task`.
        dataset: map-style dataset of sample dicts (random transforms inside draw from torch's RNG).
        batch_size: per process and micro-batch; the global batch is ``batch_size * accumulate * world_size``.
        run_dir: where ``state.pt``, ``model.ckpt`` and ``metrics.jsonl`` go (and what hooks write).
        save_model: ``fn(path, model)`` that writes the deliverable checkpoint (rank 0 only).
        hooks: extension points (:mod:`sfdaseg.engine.hooks`), called in order after the trainer's own progress
            bar and TensorBoard hooks.
        config: the resolved run config (a plain dict), stored in the training state.
        checkpoints: write ``state.pt`` every ``train.ckpt_every`` steps and at the end (a benchmark turns it off).
    """

    def __init__(self, task: Task, dataset: Dataset, *, train_cfg: TrainConfig, optim_cfg: OptimConfig,
                 batch_size: int, num_workers: int, device: torch.device, dist_info: DistInfo, run_dir: Path,
                 save_model: Callable[[Path, nn.Module], None], hooks: Sequence[HookBase] = (),
                 config: dict | None = None, collate_fn: Callable | None = None, checkpoints: bool = True) -> None:
        self.task, self.dataset, self.cfg, self.optim_cfg = task, dataset, train_cfg, optim_cfg
        self.batch_size, self.num_workers = batch_size, num_workers
        self.device, self.dist, self.run_dir = device, dist_info, Path(run_dir)
        self.save_model_fn, self.config, self.collate_fn = save_model, config or {}, collate_fn
        self.checkpoints = checkpoints
        self.hooks: list[HookBase] = [ProgressHook(), TensorBoardHook(), *hooks]
        self.step = 0
        self.last_data_wait = 0.0  # seconds the last step waited for its batch(es)
        # Set by hooks: stop after the current step (a collapse guard), and the model to deliver instead of the
        # task's export (a healthy snapshot).
        self.stop_requested = False
        self.delivered: nn.Module | None = None
        self.global_batch = batch_size * train_cfg.accumulate * dist_info.world_size
        self.amp_dtype = AMP_DTYPES[train_cfg.amp]
        self.modules = dict(task.trainable_modules())
        for m in self.modules.values():
            m.to(device)
            if train_cfg.channels_last:
                m.to(memory_format=torch.channels_last)
        if dist_info.distributed and train_cfg.sync_bn:
            self.modules = {k: nn.SyncBatchNorm.convert_sync_batchnorm(m) for k, m in self.modules.items()}
        groups = task.param_groups() or build_param_groups(self.modules, optim_cfg)
        self.optimizer = build_optimizer(groups, optim_cfg, device)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        # optim.decay_to=init: the weights every step is pulled back towards (the source model's), one tensor per
        # parameter of a group with ``decay_to_init``; saved in state.pt so a resumed run keeps the same ones.
        self.init_weights = [[p.detach().clone() for p in g["params"]] if g.get("decay_to_init", 0.0) > 0 else []
                             for g in self.optimizer.param_groups]
        # fp16 needs loss scaling; bf16 and fp32 do not (GradScaler(enabled=False) is a no-op pass-through).
        self.scaler = torch.amp.GradScaler(device.type, enabled=train_cfg.amp == "fp16")
        self.wrapped: dict[str, nn.Module] = {}
        task.wrap_trainable(self._wrap)
        # Teachers and frozen models follow the students' memory format and compile setting: a channels-last
        # student next to a contiguous teacher would pay a layout conversion at every teacher layer.
        for m in task.frozen_modules().values():
            m.to(device)
            if train_cfg.channels_last:
                m.to(memory_format=torch.channels_last)
            if train_cfg.compile:
                m.compile()  # in place: parameter names stay, so the EMA update and state dicts are unchanged
        self.metrics_file = self.run_dir / "metrics.jsonl"

    @property
    def is_last_step(self) -> bool:
        return self.step == self.cfg.iters or self.stop_requested

    def delivered_model(self) -> nn.Module:
        """The model the run delivers: the task's export, unless a hook chose another (a healthy snapshot)."""
        return self.delivered if self.delivered is not None else self.task.export_model()

    # ---------------------------------------------------------------- set-up helpers

    def _wrap(self, name: str, module: nn.Module) -> nn.Module:
        # The task may hand back a module after SyncBN conversion replaced it: use ours.
        module = self.modules.get(name, module)
        out: nn.Module = module
        if self.cfg.compile:
            out = torch.compile(out)
        if self.dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            out = nn.parallel.DistributedDataParallel(out, device_ids=ids)
        self.wrapped[name] = out
        return out

    def _loader(self, start_position: int) -> Iterator[dict]:
        sampler = StreamSampler(len(self.dataset), seed=self.cfg.seed, rank=self.dist.rank,
                                world_size=self.dist.world_size, start=start_position)
        loader = DataLoader(
            SeededDataset(self.dataset), batch_size=self.batch_size, sampler=sampler,
            num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
            persistent_workers=self.num_workers > 0, drop_last=True, collate_fn=self.collate_fn,
            prefetch_factor=4 if self.num_workers > 0 else None,
        )
        return iter(loader)

    def _next_batch(self, data: Iterator[dict]) -> dict:
        try:
            batch = next(data)
        except RuntimeError as e:  # "DataLoader worker (pid(s) ...) exited unexpectedly / is killed by signal"
            hinted = worker_died(e)
            if hinted is e:
                raise
            raise hinted from e
        if isinstance(batch.get("image"), list):  # collate keeps samples of different sizes as a list
            sizes = sorted({tuple(im.shape[-2:]) for im in batch["image"]})
            raise ConfigError(f"a training batch holds images of different sizes {sizes} (H, W) "
                              f"({', '.join(map(str, batch.get('name', [])[:4]))}); set data.crop=[H, W] "
                              "(or data.resize) so that every sample has one size, or data.batch_size=1")
        return batch

    def _to_device(self, batch: dict) -> dict:
        out = {}
        for k, v in batch.items():
            if torch.is_tensor(v):
                v = v.to(self.device, non_blocking=True)
                if k == "image" and self.cfg.channels_last and v.ndim == 4:
                    v = v.contiguous(memory_format=torch.channels_last)
            out[k] = v
        return out

    def _set_lr(self, step: int) -> float:
        f = lr_factor(step, total=self.cfg.iters, cfg=self.optim_cfg)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * f
        return self.base_lrs[0] * f

    def train_mode(self) -> None:
        """Every trainable module back in train mode (after an evaluation or a monitor pass)."""
        for m in self.modules.values():
            m.train()

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": "sfdaseg-train-state",
            "version": 1,
            "step": self.step,
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "init_weights": self.init_weights,
            "task": self.task.state_dict(),
            "config": self.config,
            "world_size": self.dist.world_size,
        }

    def save_state(self) -> None:
        if self.dist.is_main:
            atomic_save(self.state_dict(), self.run_dir / STATE_FILE)
        barrier()

    def load_state(self, path: Path) -> None:
        state = safe_load(path, map_location=self.device)
        if state.get("format") != "sfdaseg-train-state":
            raise CheckpointError(f"{path}: not an sfdaseg training state (format={state.get('format')!r})")
        missing = set(self.modules) ^ set(state["modules"])
        if missing:
            raise CheckpointError(f"{path}: the saved run trained modules {sorted(state['modules'])}, "
                                  f"this run trains {sorted(self.modules)}")
        try:
            for k, m in self.modules.items():
                m.load_state_dict(state["modules"][k])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:  # another model, model.options or optimizer
            first = str(e).strip().splitlines()[:3]
            raise CheckpointError(f"{path}: the saved run does not fit this run's model/optimizer (was model.*, "
                                  f"optim.* or the class list changed?): {' '.join(first)}") from e
        self.scaler.load_state_dict(state["scaler"])
        saved_init = state.get("init_weights")
        if saved_init is not None:
            if [len(a) for a in saved_init] != [len(a) for a in self.init_weights]:
                raise CheckpointError(f"{path}: the saved run was started with another optim.decay_to or "
                                      "optim.weight_decay setting (its init weights do not fit this run)")
            self.init_weights = [[t.to(self.device) for t in a] for a in saved_init]
        self.task.load_state_dict(state["task"])
        if state.get("world_size", 1) != self.dist.world_size:
            logger.warning(f"resuming a run saved with world size {state.get('world_size')} on "
                           f"{self.dist.world_size} processes: the sample order after the resume differs")
        self.step = int(state["step"])

    # ---------------------------------------------------------------- logging

    def log_metrics(self, record: dict[str, Any]) -> None:
        """Append ``record`` (with a ``step``) to ``metrics.jsonl`` and hand it to every hook (rank 0 only)."""
        if not self.dist.is_main:
            return
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(record) + "\n")
        for h in self.hooks:
            h.on_log(self, record)

    def _call(self, event: str) -> None:
        for h in self.hooks:
            getattr(h, event)(self)

    # ---------------------------------------------------------------- the loop

    def train(self, *, resume: bool = False) -> Path:
        """Run to ``cfg.iters`` steps (continuing from ``state.pt`` when ``resume``); return ``model.ckpt``."""
        state_path = self.run_dir / STATE_FILE
        if resume and state_path.exists():
            self.load_state(state_path)
            logger.info(f"resumed from {state_path} at step {self.step}")
        if resume and self.dist.is_main:
            trim_metrics(self.metrics_file, self.step)  # drop what a killed run logged after its last checkpoint
        data = self._loader(self.step * self.global_batch)
        self._last_good_step = self.step
        try:
            self._call("before_train")
            self.train_mode()
            self._logs = _LogWindow(self.device)
            while self.step < self.cfg.iters and not self.stop_requested:
                self._call("before_step")
                self._run_step(data)
                self._call("after_step")
                if self.stop_requested and not (self.step % self.cfg.ckpt_every == 0 or self.step == self.cfg.iters):
                    # The step a hook stopped at is logged and saved like a last one.
                    if self._logs.count:
                        self._flush_logs(self._lr)
                    if self.checkpoints:
                        self.save_state()
            if self.dist.distributed:
                diff = self._replica_max_abs_diff()
                self.log_metrics({"step": self.step, "replica_max_abs_diff": diff})
                if diff != 0.0:
                    logger.warning(f"DDP replicas differ by up to {diff:g} at the end")
            self._call("after_train")
            model_path = self.run_dir / MODEL_FILE
            if self.dist.is_main:
                self.save_model_fn(model_path, self.delivered_model())
            barrier()
        finally:
            self._call("close")
        return model_path

    def _run_step(self, data: Iterator[dict]) -> None:
        """One optimizer step: micro-batches, backward, clipping, the step, the task's update, logs, checkpoint."""
        cfg, step = self.cfg, self.step
        # Per-step reseed: dropout and any random choice in the task depend on (seed, rank, step) only, so a
        # resumed run continues exactly as an uninterrupted one would.
        torch.manual_seed(sample_seed(cfg.seed + 7919 * (self.dist.rank + 1), step))
        lr = self._lr = self._set_lr(step)
        step_loss = torch.zeros((), device=self.device)
        self.last_data_wait = 0.0
        for micro in range(cfg.accumulate):
            t0 = time.perf_counter()
            batch = self._to_device(self._next_batch(data))
            self.last_data_wait += time.perf_counter() - t0
            sync_ctx = contextlib.ExitStack()
            if micro < cfg.accumulate - 1 and self.dist.distributed:
                for w in self.wrapped.values():
                    if isinstance(w, nn.parallel.DistributedDataParallel):
                        sync_ctx.enter_context(w.no_sync())
            with sync_ctx:
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    out: StepOutput = self.task.training_step(batch, step)
                self.scaler.scale(out.loss / cfg.accumulate).backward()
            step_loss += out.loss.detach().float() / cfg.accumulate
            self._logs.add(out.logs, scale=1.0 / cfg.accumulate)
        if self._skip_non_finite(step_loss, step):
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.update()
        else:
            if self.optim_cfg.grad_clip is not None:
                self.scaler.unscale_(self.optimizer)
                gnorm = nn.utils.clip_grad_norm_(self.params, self.optim_cfg.grad_clip)
                self._logs.add({"grad_norm": gnorm})
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self._decay_to_init()
            self.task.after_optimizer_step(step)
        self._logs.add({"loss": step_loss}, count=True)
        self._logs.waited(self.last_data_wait)
        self.step += 1
        do_ckpt = self.checkpoints and (self.step % cfg.ckpt_every == 0 or self.is_last_step)
        if self.step % cfg.log_every == 0 or self.is_last_step or do_ckpt:
            self._flush_logs(lr)
        if do_ckpt:
            self.save_state()
            self._last_good_step = self.step

    @torch.no_grad()
    def _decay_to_init(self) -> None:
        """``w <- w + min(1, lr * wd) * (w_init - w)`` for the groups with ``decay_to_init`` (decoupled, as AdamW's)."""
        for g, init in zip(self.optimizer.param_groups, self.init_weights):
            if init:
                torch._foreach_lerp_(g["params"], init, min(1.0, g["lr"] * g["decay_to_init"]))

    def _skip_non_finite(self, step_loss: torch.Tensor, step: int) -> bool:
        """Track non-finite losses on the device; with ``on_nan=skip`` decide now whether to skip this step."""
        self._logs.track_finite(step_loss, step)
        if self.cfg.on_nan != "skip":
            return False
        # Host sync, once per step: skipping needs a decision before the optimizer moves the weights.
        if bool(torch.isfinite(step_loss)):
            return False
        self._logs.first_bad.fill_(-1)
        logger.warning(f"non-finite loss at step {step}; step skipped")
        return True

    def _flush_logs(self, lr: float) -> None:
        # Host sync, once per log interval: read the averaged logs and the non-finite flag together.
        values, bad_step, per_s, wait_frac = self._logs.read(self.global_batch)
        if bad_step >= 0:
            self._on_non_finite(bad_step, self._last_good_step)
        self.log_metrics({"step": self.step, "lr": lr, **values, "images_per_s": per_s, "data_wait_frac": wait_frac})

    def _replica_max_abs_diff(self) -> float:
        """Largest difference of any weight or buffer across ranks (0.0 when the replicas agree exactly)."""
        import torch.distributed as dist

        flat = torch.cat([t.detach().double().flatten() for m in self.modules.values()
                          for t in m.state_dict().values() if t.is_floating_point()])
        hi, lo = flat.clone(), flat.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        return float((hi - lo).abs().max())  # host sync: once, at the end of the run

    def _on_non_finite(self, bad_step: int, last_good_step: int) -> None:
        where = self.run_dir / STATE_FILE
        kept = f"the last good checkpoint (step {last_good_step}) is kept at {where}" if where.exists() else \
            "no checkpoint had been written yet"
        raise NonFiniteLossError(
            f"non-finite loss at step {bad_step}; stopped, {kept}. Lower optim.lr, set optim.grad_clip, use "
            f"train.amp=bf16 instead of fp16, or set train.on_nan=skip to skip such steps."
        )


class _LogWindow:
    """Device-side sums of the task's logs over one log interval, read on the host once per interval."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # The step where a non-finite loss first appeared, -1 if none; read with the logs (no per-step sync).
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count, self.steps, self.wait = 0, 0, 0.0
        self.t_start = time.perf_counter()

    def add(self, logs: Mapping[str, Any], *, scale: float = 1.0, count: bool = False) -> None:
        for k, v in logs.items():
            v = torch.as_tensor(v, device=self.device).detach().float()
            self.sums[k] = self.sums.get(k, 0) + v * scale
        if count:
            self.count += 1
            self.steps += 1

    def waited(self, seconds: float) -> None:
        self.wait += seconds

    def track_finite(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, step), self.first_bad)

    def read(self, global_batch: int) -> tuple[dict[str, Any], int, float, float]:
        keys = list(self.sums)
        parts = [torch.as_tensor(self.sums[k] / self.count).flatten() for k in keys]
        flat = torch.cat(parts + [self.first_bad.float().flatten()]).tolist()
        bad_step = int(flat.pop())
        values, i = {}, 0
        for k, p in zip(keys, parts):  # scalars stay floats, vector logs (class histograms) become lists
            n = p.numel()
            values[k] = flat[i] if self.sums[k].ndim == 0 else flat[i:i + n]
            i += n
        elapsed = max(time.perf_counter() - self.t_start, 1e-9)
        per_s, wait_frac = self.steps * global_batch / elapsed, self.wait / elapsed
        self._reset()
        return values, bad_step, per_s, wait_frac
