"""Run folders: refuse to overwrite a finished or running experiment; write the resolved config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sfdaseg.config import ConfigError, dump_yaml

CONFIG_FILE = "config.yaml"


def prepare_run_dir(out: str | Path, *, cfg: Any, resume: bool, command: str, is_main: bool = True) -> Path:
    """Create ``out`` (or check it for a resume) and write ``config.yaml`` with the launch command on top.

    Without ``resume``, a folder that already holds a run (a config, a training state or a model) is refused:
    nothing written by an earlier run is ever overwritten by accident.
    """
    out = Path(out)
    markers = [out / CONFIG_FILE, out / "state.pt", out / "model.ckpt"]
    if not resume and any(p.exists() for p in markers):
        raise ConfigError(
            f"--out {out}: this folder already holds a run ({', '.join(p.name for p in markers if p.exists())}). "
            f"Pass resume=true (or --resume) to continue it, or choose another --out."
        )
    if is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"--out {out}: cannot write there ({e.strerror or e})") from None
        tmp = out / (CONFIG_FILE + ".tmp")
        dump_yaml(cfg, tmp, header=f"sfdaseg {command}\nresolved config of this run; rerun with: "
                                   f"sfdaseg {command} --config {out / CONFIG_FILE}")
        os.replace(tmp, out / CONFIG_FILE)
    return out
