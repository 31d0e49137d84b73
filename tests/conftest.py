import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Two cores on CI: keep intra-op threads modest so parallel pieces (DataLoader workers, DDP ranks) don't thrash;
# OMP_NUM_THREADS, when set, wins (e.g. 1 while other jobs share the machine).
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))


@pytest.fixture(autouse=True, scope="session")
def _logging():
    """Library messages reach stderr in tests as they do under the CLI (which configures logging once)."""
    from sfdaseg.log import setup_logging

    setup_logging()


@pytest.fixture
def cli_env():
    """Environment for running ``python -m sfdaseg`` in a subprocess from the source tree."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.fixture
def python():
    return sys.executable


@pytest.fixture
def interrupt_after_first_checkpoint(monkeypatch):
    """``interrupt(run)`` calls ``run()`` with the trainer killed (KeyboardInterrupt) right after its first
    ``state.pt`` is written, as a job stopped between checkpoints, and restores the trainer afterwards."""
    from sfdaseg.engine import trainer as trainer_mod

    original = trainer_mod.Trainer.save_state

    def save_then_stop(self):
        original(self)
        raise KeyboardInterrupt

    def interrupt(run):
        with monkeypatch.context() as m:
            m.setattr(trainer_mod.Trainer, "save_state", save_then_stop)
            with pytest.raises(KeyboardInterrupt):
                run()

    return interrupt
