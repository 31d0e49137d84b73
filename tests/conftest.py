import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Two cores on CI: keep intra-op threads modest so parallel pieces (DataLoader workers, DDP ranks) don't thrash;
# OMP_NUM_THREADS, when set, wins (e.g. 1 while other jobs share the machine).
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))


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
