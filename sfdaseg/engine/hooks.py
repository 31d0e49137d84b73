"""Extension points of the training loop: :class:`HookBase` and the hooks every run uses.

The loop (:class:`sfdaseg.engine.trainer.Trainer`) owns the step, its logs and checkpoints; everything else that
happens around it is a hook, called in list order::

    before_train(trainer)                 # once, after a resume has restored the state
    for each optimizer step:
        before_step(trainer)
        ... training_step, backward, optimizer step, task.after_optimizer_step, logs, checkpoint ...
        after_step(trainer)               # trainer.step is the number of steps done
    after_train(trainer)                  # after the last step, before model.ckpt is written
    close(trainer)                        # always, also when the run stops with an error

    on_log(trainer, record)               # every record the trainer appends to metrics.jsonl (rank 0)

A hook reads the loop's state through the trainer (``step``, ``cfg``, ``dist``, ``run_dir``, ``task``,
``is_last_step``, ``last_data_wait``) and writes records with :meth:`Trainer.log_metrics`. Every method is a no-op
by default, so a hook implements only what it needs. Add a hook by passing it in ``Trainer(..., hooks=[...])``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from torch import nn

from sfdaseg.engine.distributed import barrier
from sfdaseg.storage import atomic_write_text

if TYPE_CHECKING:  # annotations only: the trainer imports this module
    from sfdaseg.engine.trainer import Trainer

__all__ = ["EvalHook", "HookBase", "MonitorHook", "ProgressHook", "TensorBoardHook"]

logger = logging.getLogger(__name__)


class HookBase:
    """No-op hook: subclasses override the methods they need (see the module docstring for the order)."""

    def before_train(self, trainer: "Trainer") -> None:
        pass

    def before_step(self, trainer: "Trainer") -> None:
        pass

    def after_step(self, trainer: "Trainer") -> None:
        pass

    def after_train(self, trainer: "Trainer") -> None:
        pass

    def close(self, trainer: "Trainer") -> None:
        pass

    def on_log(self, trainer: "Trainer", record: dict[str, Any]) -> None:
        pass


class ProgressHook(HookBase):
    """A tqdm bar on stderr (rank 0, ``train.progress``) with the loss, LR and images/s of the last log."""

    def __init__(self) -> None:
        self.bar = None

    def before_train(self, trainer: "Trainer") -> None:
        from tqdm import tqdm

        enabled = trainer.dist.is_main and trainer.cfg.progress and trainer.step < trainer.cfg.iters
        self.bar = tqdm(total=trainer.cfg.iters, initial=trainer.step, desc="train", dynamic_ncols=True,
                        file=sys.stderr, disable=not enabled)

    def after_step(self, trainer: "Trainer") -> None:
        self.bar.update(1)

    def on_log(self, trainer: "Trainer", record: dict[str, Any]) -> None:
        if self.bar is not None and "loss" in record:
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 img_s=f"{record['images_per_s']:.1f}")

    def close(self, trainer: "Trainer") -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TensorBoardHook(HookBase):
    """Every finite scalar of every logged record to ``RUN/tb`` (rank 0, ``train.tensorboard``)."""

    def __init__(self) -> None:
        self.writer = None

    def on_log(self, trainer: "Trainer", record: dict[str, Any]) -> None:
        if not trainer.cfg.tensorboard:
            return
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(trainer.run_dir / "tb"))
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                self.writer.add_scalar(k, v, record["step"])
        self.writer.flush()

    def close(self, trainer: "Trainer") -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class EvalHook(HookBase):
    """Validation: ``evaluate(model) -> dict`` every ``train.eval_every`` steps and at the end.

    ``evaluate`` runs on every rank (it reduces across ranks itself); rank 0 logs ``val/*`` and, at the end,
    writes ``RUN/eval.json``. The model evaluated is the delivered one (after a collapse guard's choice: put the
    guard before this hook).
    """

    def __init__(self, evaluate: Callable[[nn.Module], dict]) -> None:
        self.evaluate = evaluate

    def _run(self, trainer: "Trainer") -> dict | None:
        result = self.evaluate(trainer.delivered_model())
        if trainer.dist.is_main and result is not None:
            trainer.log_metrics({"step": trainer.step, **{f"val/{k}": v for k, v in result.items()
                                                         if isinstance(v, (int, float))}})
            logger.info(f"step {trainer.step}: val mIoU {result.get('miou', float('nan')):.2f}")
        trainer.train_mode()
        return result

    def after_step(self, trainer: "Trainer") -> None:
        every = trainer.cfg.eval_every
        if every and trainer.step % every == 0 and not trainer.is_last_step:
            self._run(trainer)

    def after_train(self, trainer: "Trainer") -> None:
        result = self._run(trainer)
        if trainer.dist.is_main and result is not None:
            atomic_write_text(trainer.run_dir / "eval.json", json.dumps(result, indent=2))


GUARD_POLICIES = ("rollback", "stop", "warn")
ROLLBACK_TARGETS = ("last_healthy", "source")


class MonitorHook(HookBase):
    """Label-free signals and the collapse guard: ``monitor(model, step) -> dict`` on rank 0, logged as ``unsup/*``.

    Measured before the first step of a fresh run, every ``every`` steps (0: never in between) and at the end. The
    dict's ``"alarms"`` (the number of collapse alarms; ``monitor.last_alarms`` their messages) drive the guard:

    - every measurement without an alarm writes the delivered model to ``RUN/guard/healthy.ckpt`` (``save``);
    - ``on_collapse="warn"``: an alarm is logged, the run goes on and delivers its final model;
    - ``"stop"``: the run stops at the first alarm and delivers the last healthy snapshot;
    - ``"rollback"``: the run goes on; when the final measurement raises an alarm, the last healthy snapshot is
      delivered instead of the final model (the log, ``RUN/guard/state.json`` and the report say so).

    ``rollback_to="source"`` keeps only the first snapshot (step 0 of a source-free run: the source model), so a
    rollback or a stop delivers the source model itself: the snapshots just before a collapse alarm are often
    already worse than the source model (measured: the README's learning-rate table).

    The guard's state (``RUN/guard/state.json``) survives a resume. Under DDP rank 0 measures (``monitor`` may be
    None on the other ranks) and decides, and every rank follows.
    """

    def __init__(self, monitor: Callable[[nn.Module, int], dict] | None, *, every: int = 0, on_collapse: str = "warn",
                 rollback_to: str = "last_healthy", save: Callable[[Path, nn.Module], None] | None = None,
                 load: Callable[[Path], nn.Module] | None = None) -> None:
        if on_collapse not in GUARD_POLICIES:
            raise ValueError(f"MonitorHook: on_collapse must be one of {GUARD_POLICIES}, got {on_collapse!r}")
        if rollback_to not in ROLLBACK_TARGETS:
            raise ValueError(f"MonitorHook: rollback_to must be one of {ROLLBACK_TARGETS}, got {rollback_to!r}")
        self.monitor, self.every, self.on_collapse, self.rollback_to = monitor, every, on_collapse, rollback_to
        self.save, self.load = save, load
        self.state: dict[str, Any] = {"on_collapse": on_collapse, "rollback_to": rollback_to, "healthy_step": None,
                                      "alarms": [], "measured": [], "delivered_step": None, "rolled_back": False,
                                      "stopped_at": None}

    def _paths(self, trainer: "Trainer") -> tuple[Path, Path]:
        folder = trainer.run_dir / "guard"
        return folder / "healthy.ckpt", folder / "state.json"

    def _write_state(self, trainer: "Trainer") -> None:
        if trainer.dist.is_main:
            atomic_write_text(self._paths(trainer)[1], json.dumps(self.state, indent=1))

    def _run(self, trainer: "Trainer") -> None:
        alarm = 0
        if trainer.dist.is_main:
            model = trainer.task.export_model()
            values = self.monitor(model, trainer.step)
            trainer.log_metrics({"step": trainer.step, **{f"unsup/{k}": v for k, v in values.items()}})
            alarm = int(values.get("alarms", 0))
            self.state["measured"] = sorted(set(self.state["measured"]) | {trainer.step})
            if alarm:
                messages = list(getattr(self.monitor, "last_alarms", []))
                self.state["alarms"].append({"step": trainer.step, "messages": messages})
                then = {"warn": "training goes on; the final model is delivered as it is",
                        "stop": "the run stops and delivers the last healthy snapshot",
                        "rollback": "training goes on; if the final model is still flagged, the last healthy snapshot "
                                    "is delivered"}[self.on_collapse]
                logger.warning(f"collapse guard (monitor.on_collapse={self.on_collapse}): alarm at step "
                               f"{trainer.step}; {then} (last healthy: step {self.state['healthy_step']})")
            elif self.save is not None and self.on_collapse != "warn" and (
                    self.rollback_to == "last_healthy" or self.state["healthy_step"] is None):
                self.save(self._paths(trainer)[0], model)
                self.state["healthy_step"] = trainer.step
            self._write_state(trainer)
        trainer.train_mode()
        if self.on_collapse == "stop" and _broadcast_flag(alarm, trainer) and not trainer.is_last_step:
            trainer.stop_requested = True
            self.state["stopped_at"] = trainer.step

    def before_train(self, trainer: "Trainer") -> None:
        path = self._paths(trainer)[1]
        if trainer.step > 0 and path.exists():  # a resume: the guard goes on from where it was
            saved = json.loads(path.read_text())
            # Measurements after the resumed step are made again (a resume repeats those steps exactly).
            saved["measured"] = [m for m in saved.get("measured", []) if m <= trainer.step]
            saved["alarms"] = [a for a in saved.get("alarms", []) if a["step"] <= trainer.step]
            self.state = {**self.state, **saved, "stopped_at": None}
        due = self.every and trainer.step % self.every == 0 and trainer.step not in self.state["measured"]
        if trainer.step == 0 or (due and not trainer.is_last_step):
            # The starting point (for a source-free run, the source model's signals), or a measurement a killed
            # run missed: it saved its checkpoint at this step and stopped before measuring.
            self._run(trainer)

    def after_step(self, trainer: "Trainer") -> None:
        if self.every and trainer.step % self.every == 0 and not trainer.is_last_step:
            self._run(trainer)

    def after_train(self, trainer: "Trainer") -> None:
        if self.state["stopped_at"] != trainer.step:  # a stop was measured at its own step
            self._run(trainer)
        final_alarm = bool(self.state["alarms"]) and self.state["alarms"][-1]["step"] == trainer.step
        healthy = self.state["healthy_step"]
        roll = self.on_collapse in ("rollback", "stop") and final_alarm and healthy is not None
        if _broadcast_flag(int(roll), trainer):
            barrier()  # rank 0 wrote the snapshot; every rank delivers (and evaluates) the same model
            trainer.delivered = self.load(self._paths(trainer)[0]).to(trainer.device)
            self.state.update(delivered_step=healthy, rolled_back=True)
            what = "the source model (rollback_to=source)" if self.rollback_to == "source" else "last healthy snapshot"
            logger.warning(f"collapse guard: the final model (step {trainer.step}) raised an alarm; delivering the "
                           f"{what} instead, from step {healthy} ({self._paths(trainer)[0]})")
        else:
            self.state.update(delivered_step=trainer.step, rolled_back=False)
            if final_alarm:
                logger.warning(f"collapse guard: the delivered final model (step {trainer.step}) raised a collapse "
                               f"alarm" + ("" if healthy is not None or self.on_collapse == "warn" else
                                           "; no healthy snapshot to fall back on"))
        self._write_state(trainer)


def _broadcast_flag(value: int, trainer: "Trainer") -> bool:
    """Rank 0's ``value`` on every rank (a collective: all ranks call it at the same point)."""
    if not trainer.dist.distributed:
        return bool(value)
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], device=trainer.device)
    dist.broadcast(t, src=0)
    return bool(t.item())  # host sync: once per measurement
