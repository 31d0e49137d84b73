"""The one training loop of sfdaseg.

Source training and every adaptation recipe run through :class:`Trainer`. A *task* computes a loss; the trainer
owns everything else: the data stream, backward, AMP, gradient accumulation and clipping, the optimizer and LR
schedule, DDP, checkpoints, resume, non-finite-loss handling and logs. AMP and DDP are switches, not subclasses.

A task is any object with:

- ``trainable_modules() -> dict[str, nn.Module]``: the modules the optimizer updates (raw, unwrapped);
- ``wrap_trainable(wrap)``: called once; ``wrap(name, module)`` returns the module to call in the step (a DDP
  wrapper under ``torchrun``, a compiled module, or the module itself). The task calls what it got back;
- ``training_step(batch, step) -> StepOutput``: the loss (a scalar tensor) and detached logs; it never calls
  ``backward`` or steps an optimizer;
- ``export_model() -> SegmentationModel``: the model the run delivers (the student, an EMA teacher, ...);

and optionally ``after_optimizer_step(step)`` (e.g. the EMA update), ``state_dict()`` / ``load_state_dict()`` for
non-trainable state that must survive a resume (teachers, prototypes), and ``param_groups()`` to override the
default per-module groups.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from sfdaseg.config import ConfigError, OptimConfig, TrainConfig
from sfdaseg.engine.checkpoint import CheckpointError, atomic_save, safe_load
from sfdaseg.engine.distributed import DistInfo, SeededDataset, StreamSampler, barrier, sample_seed
from sfdaseg.engine.rundir import trim_metrics

STATE_FILE = "state.pt"  # everything needed to resume
MODEL_FILE = "model.ckpt"  # the deliverable: a model checkpoint in the library's format


@dataclass
class StepOutput:
    """What a task's ``training_step`` returns: ``loss`` (scalar, with grad) and detached scalar ``logs``."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


class NonFiniteLossError(RuntimeError):
    pass


def log(msg: str, *, dist_info: DistInfo | None = None) -> None:
    """Progress messages go to stderr (stdout is kept for results, e.g. the checkpoint path)."""
    if dist_info is None or dist_info.is_main:
        print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ optimizer


def build_param_groups(modules: Mapping[str, nn.Module], cfg: OptimConfig) -> list[dict[str, Any]]:
    """One group per (module, backbone|head, decay|no-decay); the head gets ``cfg.head_lr_mult``.

    A module may carry an ``lr_mult`` attribute (a float) that scales every group of its own on top of that: a
    generator or discriminator trained from scratch beside a fine-tuned model wants a larger step than the model.
    Each group records its ``lr_mult`` so the schedule scales every group from its own base LR.
    """
    groups: list[dict[str, Any]] = []
    seen: set[int] = set()
    for mname, module in modules.items():
        parts = module.param_groups() if hasattr(module, "param_groups") else {"all": list(module.parameters())}
        for pname, params in parts.items():
            mult = (cfg.head_lr_mult if pname == "head" else 1.0) * float(getattr(module, "lr_mult", 1.0))
            decay, no_decay = [], []
            for p in params:
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                (no_decay if cfg.no_decay_norm_bias and p.ndim <= 1 else decay).append(p)
            for suffix, ps, wd in (("", decay, cfg.weight_decay), ("/no_decay", no_decay, 0.0)):
                if ps:
                    groups.append({"params": ps, "lr": cfg.lr * mult, "lr_mult": mult, "weight_decay": wd,
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
        task: see the module docstring.
        dataset: map-style dataset of sample dicts (random transforms inside draw from torch's RNG).
        batch_size: per process and micro-batch; the global batch is ``batch_size * accumulate * world_size``.
        run_dir: where ``state.pt``, ``model.ckpt``, ``metrics.jsonl`` and TensorBoard files go.
        evaluate: optional ``fn(model) -> dict`` run on every rank (it reduces across ranks itself) every
            ``eval_every`` steps and at the end; rank 0 logs the result.
        monitor: optional ``fn(model, step) -> dict`` of label-free scalars, run on rank 0 only, before the
            first step of a fresh run, every ``monitor_every`` steps (0: never in between) and at the end;
            logged with an ``unsup/`` prefix.
        save_model: ``fn(path, model)`` that writes the deliverable checkpoint (rank 0 only).
        config: the resolved run config (a plain dict), stored in the training state.
    """

    def __init__(self, task: Any, dataset: Dataset, *, train_cfg: TrainConfig, optim_cfg: OptimConfig,
                 batch_size: int, num_workers: int, device: torch.device, dist_info: DistInfo, run_dir: Path,
                 save_model: Callable[[Path, nn.Module], None], evaluate: Callable[[nn.Module], dict] | None = None,
                 config: dict | None = None, collate_fn: Callable | None = None,
                 monitor: Callable[[nn.Module, int], dict] | None = None, monitor_every: int = 0) -> None:
        self.task, self.dataset, self.cfg, self.optim_cfg = task, dataset, train_cfg, optim_cfg
        self.batch_size, self.num_workers = batch_size, num_workers
        self.device, self.dist, self.run_dir = device, dist_info, Path(run_dir)
        self.save_model_fn, self.evaluate_fn, self.config = save_model, evaluate, config or {}
        self.collate_fn = collate_fn
        self.monitor_fn, self.monitor_every = monitor, monitor_every
        self.step = 0
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[train_cfg.amp]
        self.modules = dict(task.trainable_modules())
        for m in self.modules.values():
            m.to(device)
            if train_cfg.channels_last:
                m.to(memory_format=torch.channels_last)
        if dist_info.distributed and train_cfg.sync_bn:
            self.modules = {k: nn.SyncBatchNorm.convert_sync_batchnorm(m) for k, m in self.modules.items()}
        groups = task.param_groups() if hasattr(task, "param_groups") else build_param_groups(self.modules, optim_cfg)
        self.optimizer = build_optimizer(groups, optim_cfg, device)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        # fp16 needs loss scaling; bf16 and fp32 do not (GradScaler(enabled=False) is a no-op pass-through).
        self.scaler = torch.amp.GradScaler(device.type, enabled=train_cfg.amp == "fp16")
        self.wrapped: dict[str, nn.Module] = {}
        task.wrap_trainable(self._wrap)
        self.writer = None
        self.metrics_file = self.run_dir / "metrics.jsonl"

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
            if "DataLoader worker" not in str(e):
                raise
            raise RuntimeError(f"{e}. Rerun with data.num_workers=0 to see the error in the main process; a worker "
                               "killed by the system is often out of memory (lower data.num_workers, "
                               "data.batch_size or data.crop)") from e
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

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": "sfdaseg-train-state",
            "version": 1,
            "step": self.step,
            "modules": {k: m.state_dict() for k, m in self.modules.items()},
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "task": self.task.state_dict() if hasattr(self.task, "state_dict") else {},
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
        if hasattr(self.task, "load_state_dict"):
            self.task.load_state_dict(state["task"])
        if state.get("world_size", 1) != self.dist.world_size:
            log(f"warning: resuming a run saved with world size {state.get('world_size')} on "
                f"{self.dist.world_size} processes: the sample order after the resume differs", dist_info=self.dist)
        self.step = int(state["step"])

    # ---------------------------------------------------------------- logging

    def _log_metrics(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.metrics_file, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.cfg.tensorboard:
            if self.writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.run_dir / "tb"))
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.writer.add_scalar(k, v, record["step"])
            self.writer.flush()

    def _run_eval(self) -> dict | None:
        if self.evaluate_fn is None:
            return None
        model = self.task.export_model()
        result = self.evaluate_fn(model)
        if self.dist.is_main and result is not None:
            self._log_metrics({"step": self.step, **{f"val/{k}": v for k, v in result.items()
                                                      if isinstance(v, (int, float))}})
            log(f"step {self.step}: val mIoU {result.get('miou', float('nan')):.2f}", dist_info=self.dist)
        return result

    def _run_monitor(self) -> None:
        if self.monitor_fn is None or not self.dist.is_main:
            return
        values = self.monitor_fn(self.task.export_model(), self.step)
        self._log_metrics({"step": self.step, **{f"unsup/{k}": v for k, v in values.items()}})

    # ---------------------------------------------------------------- the loop

    def train(self, *, resume: bool = False) -> Path:
        """Run to ``cfg.iters`` steps (continuing from ``state.pt`` when ``resume``); return ``model.ckpt``."""
        state_path = self.run_dir / STATE_FILE
        if resume and state_path.exists():
            self.load_state(state_path)
            log(f"resumed from {state_path} at step {self.step}", dist_info=self.dist)
        if resume and self.dist.is_main:
            trim_metrics(self.metrics_file, self.step)  # drop what a killed run logged after its last checkpoint
        cfg = self.cfg
        global_batch = self.batch_size * cfg.accumulate * self.dist.world_size
        data = self._loader(self.step * global_batch)
        progress = None
        if self.dist.is_main and cfg.progress and self.step < cfg.iters:
            from tqdm import tqdm

            progress = tqdm(total=cfg.iters, initial=self.step, desc="train", dynamic_ncols=True, file=sys.stderr)

        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        log_sums: dict[str, torch.Tensor] = {}
        log_count = 0
        # Non-finite losses are tracked on the device: the step where one first appeared, -1 if none. The host
        # reads it only at log/checkpoint time (one sync), unless on_nan=skip needs a decision every step.
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        wait_time, t_last, steps_since = 0.0, time.perf_counter(), 0
        last_good_step = self.step
        if self.step == 0:
            self._run_monitor()  # the starting point: for a source-free run, the source model's signals
        for m in self.modules.values():
            m.train()

        while self.step < cfg.iters:
            step = self.step
            # Per-step reseed: dropout and any random choice in the task depend on (seed, rank, step) only, so a
            # resumed run continues exactly as an uninterrupted one would.
            torch.manual_seed(sample_seed(cfg.seed + 7919 * (self.dist.rank + 1), step))
            lr = self._set_lr(step)
            step_loss = torch.zeros((), device=self.device)
            for micro in range(cfg.accumulate):
                t0 = time.perf_counter()
                batch = self._to_device(self._next_batch(data))
                wait_time += time.perf_counter() - t0
                last = micro == cfg.accumulate - 1
                sync_ctx = contextlib.ExitStack()
                if not last and self.dist.distributed:
                    for w in self.wrapped.values():
                        if isinstance(w, nn.parallel.DistributedDataParallel):
                            sync_ctx.enter_context(w.no_sync())
                with sync_ctx:
                    with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                        out: StepOutput = self.task.training_step(batch, step)
                    loss = out.loss / cfg.accumulate
                    self.scaler.scale(loss).backward()
                step_loss += out.loss.detach().float() / cfg.accumulate
                for k, v in out.logs.items():
                    v = torch.as_tensor(v, device=self.device).detach().float()
                    log_sums[k] = log_sums.get(k, 0) + v / cfg.accumulate

            finite = torch.isfinite(step_loss)
            first_bad = torch.where(~finite & (first_bad < 0), torch.full_like(first_bad, step), first_bad)
            skip = False
            if cfg.on_nan == "skip":
                # Host sync, once per step: skipping needs a decision before the optimizer moves the weights.
                skip = not bool(finite)
                if skip:
                    first_bad.fill_(-1)
                    log(f"warning: non-finite loss at step {step}; step skipped", dist_info=self.dist)
            if skip:
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.update()
            else:
                if self.optim_cfg.grad_clip is not None:
                    self.scaler.unscale_(self.optimizer)
                    gnorm = nn.utils.clip_grad_norm_(params, self.optim_cfg.grad_clip)
                    log_sums["grad_norm"] = log_sums.get("grad_norm", 0) + gnorm.detach().float()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                if hasattr(self.task, "after_optimizer_step"):
                    self.task.after_optimizer_step(step)
            log_sums["loss"] = log_sums.get("loss", 0) + step_loss
            log_count += 1
            self.step += 1
            steps_since += 1
            if progress is not None:
                progress.update(1)

            at_end = self.step == cfg.iters
            do_ckpt = self.step % cfg.ckpt_every == 0 or at_end
            do_log = self.step % cfg.log_every == 0 or at_end or do_ckpt
            if do_log:
                # Host sync, once per log interval: read the averaged logs and the non-finite flag together.
                keys = list(log_sums)
                parts = [torch.as_tensor(log_sums[k] / log_count).flatten() for k in keys]
                flat = torch.cat(parts + [first_bad.float().flatten()]).tolist()
                bad_step = int(flat.pop())
                values, i = {}, 0
                for k, p in zip(keys, parts):  # scalars stay floats, vector logs (class histograms) become lists
                    n = p.numel()
                    values[k] = flat[i] if log_sums[k].ndim == 0 else flat[i:i + n]
                    i += n
                if bad_step >= 0:
                    self._on_non_finite(bad_step, last_good_step, progress)
                now = time.perf_counter()
                elapsed = now - t_last
                record = {"step": self.step, "lr": lr, **values,
                          "images_per_s": steps_since * global_batch / max(elapsed, 1e-9),
                          "data_wait_frac": wait_time / max(elapsed, 1e-9)}
                self._log_metrics(record)
                if progress is not None:
                    progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}",
                                         img_s=f"{record['images_per_s']:.1f}")
                log_sums, log_count = {}, 0
                wait_time, t_last, steps_since = 0.0, time.perf_counter(), 0
            if do_ckpt:
                self.save_state()
                last_good_step = self.step
            if cfg.eval_every and self.step % cfg.eval_every == 0 and not at_end:
                self._run_eval()
                for m in self.modules.values():
                    m.train()
            if self.monitor_every and self.step % self.monitor_every == 0 and not at_end:
                self._run_monitor()
                for m in self.modules.values():
                    m.train()

        if progress is not None:
            progress.close()
        if self.dist.distributed:
            diff = self._replica_max_abs_diff()
            self._log_metrics({"step": self.step, "replica_max_abs_diff": diff})
            if diff != 0.0:
                log(f"warning: DDP replicas differ by up to {diff:g} at the end", dist_info=self.dist)
        result = self._run_eval()
        self._run_monitor()
        model_path = self.run_dir / MODEL_FILE
        if self.dist.is_main:
            if result is not None:
                (self.run_dir / "eval.json").write_text(json.dumps(result, indent=2))
            self.save_model_fn(model_path, self.task.export_model())
        barrier()
        if self.writer is not None:
            self.writer.close()
        return model_path

    def _replica_max_abs_diff(self) -> float:
        """Largest difference of any weight or buffer across ranks (0.0 when the replicas agree exactly)."""
        import torch.distributed as dist

        flat = torch.cat([t.detach().double().flatten() for m in self.modules.values()
                          for t in m.state_dict().values() if t.is_floating_point()])
        hi, lo = flat.clone(), flat.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        return float((hi - lo).abs().max())  # host sync: once, at the end of the run

    def _on_non_finite(self, bad_step: int, last_good_step: int, progress) -> None:
        if progress is not None:
            progress.close()
        where = self.run_dir / STATE_FILE
        kept = f"the last good checkpoint (step {last_good_step}) is kept at {where}" if where.exists() else \
            "no checkpoint had been written yet"
        raise NonFiniteLossError(
            f"non-finite loss at step {bad_step}; stopped, {kept}. Lower optim.lr, set optim.grad_clip, use "
            f"train.amp=bf16 instead of fp16, or set train.on_nan=skip to skip such steps."
        )
