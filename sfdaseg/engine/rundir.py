"""Run folders: refuse to overwrite a finished or running experiment; write the resolved config; tidy up a resume."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from sfdaseg.config_base import ConfigError, to_yaml
from sfdaseg.storage import atomic_write_text

CONFIG_FILE = "config.yaml"
# What an atomic write (sfdaseg.storage) leaves behind when the process is killed between creating and renaming
# its temporary file: ``.NAME.XXXXXXXX.tmp``.
_LEFTOVER_TMP = re.compile(r"^\..+\.tmp$")


def check_run_dir(out: str | Path, *, resume: bool) -> Path:
    """Refuse (``ConfigError``) an ``out`` that already holds a run unless ``resume``; writes nothing.

    A run is recognised by a config, a training state or a model in the folder: nothing written by an earlier
    run is ever overwritten by accident.
    """
    out = Path(out)
    markers = [out / CONFIG_FILE, out / "state.pt", out / "model.ckpt"]
    if not resume and any(p.exists() for p in markers):
        raise ConfigError(
            f"--out {out}: this folder already holds a run ({', '.join(p.name for p in markers if p.exists())}). "
            f"Pass resume=true (or --resume) to continue it, or choose another --out."
        )
    return out


def prepare_run_dir(out: str | Path, *, cfg: Any, resume: bool, command: str, is_main: bool = True) -> Path:
    """Create ``out`` (or check it for a resume) and write ``config.yaml`` with the launch command on top.

    Without ``resume``, a folder that already holds a run is refused (:func:`check_run_dir`). With ``resume``,
    temporary files that a killed run left behind (an interrupted atomic write) are removed: the files they
    were meant to replace are intact.
    """
    out = check_run_dir(out, resume=resume)
    if is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"--out {out}: cannot write there ({e.strerror or e})") from None
        if resume:
            for leftover in out.iterdir():
                if leftover.is_file() and _LEFTOVER_TMP.match(leftover.name):
                    leftover.unlink()
        atomic_write_text(out / CONFIG_FILE, to_yaml(cfg, header=f"sfdaseg {command}\nresolved config of this run; "
                                                             f"rerun with: sfdaseg {command} --config "
                                                             f"{out / CONFIG_FILE}"))
    return out


def trim_metrics(path: str | Path, step: int) -> None:
    """Keep the records of ``metrics.jsonl`` up to ``step`` (the step a run resumes from).

    A killed run may have logged steps after its last checkpoint (they are trained and logged again after the
    resume) and may have left a half-written last line; both go, so the file reads as one uninterrupted run.
    ``step`` 0 (no training state was saved: the run starts over) empties the file.
    """
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the torn last line of a killed run
        record_step = record.get("step") if isinstance(record, dict) else None
        if step > 0 and isinstance(record_step, int) and record_step <= step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))  # a leftover of a kill right here is removed by the next resume
