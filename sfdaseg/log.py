"""The one logging path: every module logs through ``logging.getLogger(__name__)`` (children of ``"sfdaseg"``), and
the entry point configures it once with :func:`setup_logging`.

Messages go to stderr (stdout is kept for results, e.g. the checkpoint path a command prints last), as plain
text; warnings are prefixed ``warning:``. Under ``torchrun`` only rank 0 prints (:class:`RankZeroFilter`), so a
message appears once, not once per process. Python warnings (e.g. :class:`sfdaseg.data.datasets.DatasetWarning`
for a skipped file) are routed through the same handler.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["RankZeroFilter", "setup_logging"]

_ROOT = "sfdaseg"


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


class RankZeroFilter(logging.Filter):
    """Lets records through on rank 0 only (the rank is read when a record is emitted, after ``torchrun`` set it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _rank() == 0


class _StderrHandler(logging.StreamHandler):
    """A stream handler that looks ``sys.stderr`` up at every record, so captured or redirected stderr works."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # logging.StreamHandler.__init__ assigns it
        pass


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.name == "py.warnings":  # "path:line: Category: message" -> the message
            msg = msg.strip().splitlines()[0]
            parts = msg.split(": ", 2)
            msg = parts[-1] if len(parts) == 3 else msg
        if record.levelno >= logging.WARNING and not msg.startswith(("warning:", "error:")):
            msg = f"warning: {msg}"
        return msg


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the ``sfdaseg`` loggers once (idempotent): INFO and up to stderr, rank 0 only, warnings included."""
    root = logging.getLogger(_ROOT)
    root.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_Formatter())
        handler.addFilter(RankZeroFilter())
        root.addHandler(handler)
        root.propagate = False
        warn = logging.getLogger("py.warnings")
        warn.addHandler(handler)
        warn.propagate = False
    logging.captureWarnings(True)
