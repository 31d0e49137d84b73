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
from typing import TYPE_CHECKING, Any, Callable

from torch import nn

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
    writes ``RUN/eval.json``. The model evaluated is the task's export (the delivered model).
    """

    def __init__(self, evaluate: Callable[[nn.Module], dict]) -> None:
        self.evaluate = evaluate

    def _run(self, trainer: "Trainer") -> dict | None:
        result = self.evaluate(trainer.task.export_model())
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


class MonitorHook(HookBase):
    """Label-free signals: ``monitor(model, step) -> dict`` on rank 0, logged as ``unsup/*``.

    Measured before the first step of a fresh run, every ``every`` steps (0: never in between) and at the end.
    """

    def __init__(self, monitor: Callable[[nn.Module, int], dict], *, every: int = 0) -> None:
        self.monitor, self.every = monitor, every

    def _run(self, trainer: "Trainer") -> None:
        if trainer.dist.is_main:
            values = self.monitor(trainer.task.export_model(), trainer.step)
            trainer.log_metrics({"step": trainer.step, **{f"unsup/{k}": v for k, v in values.items()}})
        trainer.train_mode()

    def before_train(self, trainer: "Trainer") -> None:
        if trainer.step == 0:
            self._run(trainer)  # the starting point: for a source-free run, the source model's signals

    def after_step(self, trainer: "Trainer") -> None:
        if self.every and trainer.step % self.every == 0 and not trainer.is_last_step:
            self._run(trainer)

    def after_train(self, trainer: "Trainer") -> None:
        self._run(trainer)
