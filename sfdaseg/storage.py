"""Files that must never be half-written or run code: atomic writes, weights-only reads, the checkpoint format.

One module for every file sfdaseg writes or reads back: model checkpoints, training states, the offline
pseudo-label cache, run configs, ONNX files. Writers go through :func:`atomic_write` (temporary file in the
destination folder, flush, fsync, ``os.replace``, fsync of the folder), so a crash or a full disk never leaves a
half-written file under the real name; readers of torch files go through :func:`safe_load`
(``torch.load(weights_only=True)``), so loading a file never runs code from it.

A model checkpoint is a dict of tensors and plain Python data only::

    {
        "format": "sfdaseg", "version": 1,
        "model": {"name": str, "build_args": dict},   # build_model(name, **build_args) rebuilds it
        "classes": ClassSpec.to_dict(),
        "normalization": Normalization.to_dict(),
        "config": dict | None,                         # the resolved run config
        "meta": dict,                                  # step, metrics, library versions, ...
        "state_dict": {name: tensor},
    }

It is written either as a torch file (``.pt``, read back with ``torch.load(weights_only=True)``) or as
``.safetensors`` (the same dict minus ``state_dict`` as JSON in the header metadata under ``"sfdaseg"``).
Building a model from a checkpoint needs the model registry: :func:`sfdaseg.models.load_model` and
:func:`sfdaseg.models.save_model` sit above this module (it imports nothing of the models).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import pickletools
import re
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Mapping

import torch

from sfdaseg.data.classes import ClassSpec
from sfdaseg.normalization import Normalization


FORMAT = "sfdaseg"
VERSION = 1
SAFETENSORS_SUFFIX = ".safetensors"
_SAFETENSORS_KEY = "sfdaseg"  # header-metadata key holding the JSON of everything but the state dict


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit what was asked for; the message names the file."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist (also a ``FileNotFoundError``)."""


# --------------------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------------------


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable. Not possible everywhere (Windows, some network file systems): best effort."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask (read without changing it where Linux allows; mkstemp's files are 0600 otherwise)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class _ErrorKeepingWriter:
    """A file wrapper that remembers the first ``OSError`` of a write.

    ``torch.save`` writes through a C++ zip writer that turns an exception raised by ``file.write`` (e.g.
    ``ENOSPC``, disk full) into an unrelated ``RuntimeError`` ("unexpected pos ..."); the error kept here is
    re-raised instead, so the message says what happened.
    """

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], *, durable: bool = True) -> Path:
    """Write ``path`` atomically: ``write(f)`` fills a temporary file in the same folder, then ``os.replace``.

    ``durable`` also fsyncs the file and the folder (a power cut cannot lose the rename); the offline label cache
    writes thousands of small entries without it (a torn entry fails to decode and is rebuilt). On failure (e.g.
    ``OSError(ENOSPC)``) the temporary file is removed, a previous file at ``path`` stays intact, and the error is
    re-raised naming ``path``; a non-OS error becomes a :class:`CheckpointError`. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    writer: _ErrorKeepingWriter | None = None
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # the permissions of a plain open(), not mkstemp's private 0600
                os.fchmod(f.fileno(), 0o666 & ~_umask())
            writer = _ErrorKeepingWriter(f)
            write(writer)  # type: ignore[arg-type]
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        # The previous file (if any) is untouched: only the temporary file is removed.
        with contextlib.suppress(OSError):
            tmp.unlink()
        if writer is not None and writer.error is not None and not isinstance(e, OSError):
            e = writer.error  # the OS error behind a serializer's RuntimeError
        kept = f"; the previous {path.name} is unchanged" if path.exists() else ""
        if isinstance(e, OSError):
            if e.errno is None:
                raise OSError(f"could not write {path}: {e}{kept}") from e
            raise type(e)(e.errno, f"could not write {path}: {e.strerror or e}{kept}") from e
        if isinstance(e, Exception):
            raise CheckpointError(f"could not write {path}: {type(e).__name__}: {e}{kept}") from e
        raise
    if durable:
        _fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """For writers that take a file *name* (an ONNX exporter): yields a temporary path in ``path``'s folder that is
    renamed over ``path`` (fsync'ed) when the block succeeds and removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically: temp file in the same folder, flush + fsync, ``os.replace``.

    On failure (e.g. ``OSError(ENOSPC)``) the temporary file is removed, a previous file at ``path`` stays
    intact, and the error is re-raised naming ``path``. Returns ``path``.
    """
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(path: str | Path, data: bytes, *, durable: bool = True) -> Path:
    """``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data), durable=durable)


def atomic_write_text(path: str | Path, text: str, *, durable: bool = True) -> Path:
    """UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


# --------------------------------------------------------------------------------------------------------------
# Weights-only reads
# --------------------------------------------------------------------------------------------------------------

# Globals that every torch checkpoint references; listing them in an error message would only distract.
_HARMLESS_PREFIXES = ("torch.", "collections.", "builtins.", "_codecs.")


def _pickle_bytes(path: Path) -> bytes | None:
    """The pickle stream of a torch file (``data.pkl`` of the zip format, or the whole legacy file)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if n.endswith("data.pkl")]
                return zf.read(names[0]) if names else None
        return path.read_bytes()
    except (OSError, zipfile.BadZipFile, KeyError):
        return None


def _scan_pickle_globals(data: bytes) -> list[str] | None:
    """Names the pickle would import (GLOBAL / STACK_GLOBAL), found by parsing opcodes (nothing is executed).

    Returns ``None`` when the bytes are not a parseable pickle (corrupt file, not a checkpoint at all).
    """
    names: list[str] = []
    strings: list[str] = []
    stream = io.BytesIO(data)
    try:
        # A legacy torch file is several pickles back to back: parse until the bytes run out.
        while stream.tell() < len(data):
            for op, arg, _ in pickletools.genops(stream):
                if op.name == "GLOBAL":
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
            if stream.tell() < len(data) and data[stream.tell() :].strip(b"\x00") == b"":
                break
    except Exception:  # noqa: BLE001 - any parse failure means "not a readable pickle"
        return names or None
    return names


def _refuse_code(path: Path, err: Exception) -> CheckpointError:
    # torch names the first global it blocked; otherwise (a plain pickle the weights-only unpickler cannot
    # even parse) list what the pickle would import, found without executing it.
    blocked = re.search(r"GLOBAL ([\w.]+)", str(err))
    if blocked:
        suspicious = [blocked.group(1)]
    else:
        data = _pickle_bytes(path)
        names = _scan_pickle_globals(data) if data is not None else None
        if names is None:
            return CheckpointError(
                f"cannot read checkpoint {path}: the file is corrupt or not a torch checkpoint "
                "(its bytes are not a readable pickle)"
            )
        suspicious = sorted({n for n in names if not n.startswith(_HARMLESS_PREFIXES)})
    found = f" (it references {', '.join(suspicious[:5])})" if suspicious else ""
    return CheckpointError(
        f"refusing to load {path}: it contains Python objects/code{found}; sfdaseg checkpoints hold only "
        "tensors and plain data, and are read with torch.load(weights_only=True). If you trust this file, "
        "load it yourself and re-save its tensors."
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def safe_load(path: str | Path, map_location: Any = "cpu", *, mmap: bool = False) -> dict:
    """Read a checkpoint without executing code: ``torch.load(..., weights_only=True)``.

    ``.safetensors`` files are read too: an sfdaseg safetensors checkpoint comes back as the same dict as
    the torch format; any other safetensors file as its ``{name: tensor}`` dict.

    Raises:
        CheckpointNotFoundError: ``path`` does not exist.
        CheckpointError: the file carries Python objects/code (refused, nothing executed), is truncated or
            corrupt, or does not hold a dict. The message names the file.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, expected a checkpoint file")
    if path.suffix == SAFETENSORS_SUFFIX:
        return _load_safetensors(path, map_location)
    if path.stat().st_size == 0:
        raise CheckpointError(f"cannot read checkpoint {path}: the file is empty")
    try:
        with warnings.catch_warnings():
            # Plain pickles (protocol 4/5) trigger a protocol warning before being refused anyway.
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
            if mmap and zipfile.is_zipfile(path):
                obj = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
            else:
                obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refuse_code(path, e) from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, AttributeError, ImportError) as e:
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is truncated or corrupt ({_first_line(e)})"
        ) from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict at the top level, found {type(obj).__name__}")
    return dict(obj)


def _load_safetensors(path: Path, map_location: Any = "cpu") -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
        tensors = load_file(str(path), device=device)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is truncated or not a safetensors file ({_first_line(e)})"
        ) from e
    if _SAFETENSORS_KEY not in metadata:
        return tensors
    return {**_safetensors_header(path, metadata), "state_dict": tensors}


def is_sfdaseg_checkpoint(obj: Any) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == FORMAT


def unwrap_state_dict(obj: Mapping, *, source: str | Path) -> dict[str, torch.Tensor]:
    """The ``{name: tensor}`` dict inside a loaded file.

    Accepts an sfdaseg checkpoint, a bare state dict, or a training checkpoint that nests it under
    ``"state_dict"`` or ``"model"`` (torchvision references, Lightning). A ``module.`` prefix on every key
    (saved from a DDP wrapper) is removed.
    """
    if is_sfdaseg_checkpoint(obj):
        obj = obj["state_dict"]
    elif not _all_tensors(obj):
        for key in ("state_dict", "model", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and _all_tensors(inner):
                obj = inner
                break
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad or not obj:
        what = f"key {bad[0]!r} holds a {type(obj[bad[0]]).__name__}" if bad else "it is empty"
        raise CheckpointError(f"{source}: expected a state dict (parameter name -> tensor), but {what}")
    sd = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _all_tensors(d: Mapping) -> bool:
    return all(isinstance(v, torch.Tensor) for v in d.values())


def load_state_dict_file(path: str | Path, map_location: Any = "cpu") -> dict[str, torch.Tensor]:
    """A plain state dict from a torch or safetensors file (torchvision weights, HF shards, our checkpoints)."""
    path = Path(path).expanduser()
    return unwrap_state_dict(safe_load(path, map_location), source=path)


# --------------------------------------------------------------------------------------------------------------
# Model checkpoints
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointInfo:
    """Everything in a model checkpoint except the tensors."""

    name: str
    build_args: dict
    classes: ClassSpec
    normalization: Normalization
    config: dict | None = None
    meta: dict = field(default_factory=dict)
    version: int = VERSION
    path: Path | None = None

    @property
    def num_classes(self) -> int:
        return int(self.build_args["num_classes"])

    @classmethod
    def from_checkpoint(cls, obj: Mapping, *, path: str | Path | None = None) -> "CheckpointInfo":
        where = str(path) if path is not None else "checkpoint"
        if not is_sfdaseg_checkpoint(obj):
            raise CheckpointError(
                f"{where} is not an sfdaseg checkpoint (no \"format\": \"sfdaseg\" entry); to start from "
                "foreign weights use build_model(name, num_classes=..., weights=PATH)"
            )
        version = obj.get("version")
        if not isinstance(version, int) or version < 1:
            raise CheckpointError(f"{where}: invalid checkpoint version {version!r}, expected a positive integer")
        if version > VERSION:
            raise CheckpointError(
                f"{where} was written by a newer sfdaseg (checkpoint format version {version}); this version "
                f"reads versions up to {VERSION}: upgrade sfdaseg"
            )
        for key in ("model", "classes", "normalization", "state_dict"):
            if key not in obj:
                raise CheckpointError(f"{where}: missing entry {key!r} in the checkpoint")
        model = obj["model"]
        if not isinstance(model, Mapping) or not isinstance(model.get("name"), str):
            raise CheckpointError(f"{where}: entry 'model' must be {{'name': str, 'build_args': dict}}")
        build_args = dict(model.get("build_args") or {})
        if not isinstance(build_args.get("num_classes"), int):
            raise CheckpointError(f"{where}: entry model.build_args has no integer 'num_classes'")
        try:
            classes = ClassSpec.from_dict(obj["classes"])
            normalization = Normalization.from_dict(obj["normalization"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: invalid 'classes' or 'normalization' entry: {e}") from e
        if classes.num_classes != build_args["num_classes"]:
            raise CheckpointError(
                f"{where}: the class list has {classes.num_classes} names but the model has "
                f"{build_args['num_classes']} classes"
            )
        config = obj.get("config")
        meta = obj.get("meta") or {}
        return cls(
            name=model["name"],
            build_args=build_args,
            classes=classes,
            normalization=normalization,
            config=dict(config) if isinstance(config, Mapping) else None,
            meta=dict(meta) if isinstance(meta, Mapping) else {},
            version=version,
            path=Path(path) if path is not None else None,
        )


def to_plain(value: Any, where: str) -> Any:
    """A copy made of dict / list / tuple / str / int / float / bool / None, or a TypeError naming the key."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, (int, float)) and hasattr(value, "item"):  # numpy scalars subclass int/float
        return value.item()
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, str):  # a str subclass (e.g. torch's TorchVersion) would pickle as its class
        return "".join(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return value.item()
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy 0-d arrays / scalars
        return value.item()
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: keys must be strings, found {k!r} ({type(k).__name__})")
            out[k] = to_plain(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [to_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(
        f"{where}: checkpoints hold only plain data (dict, list, str, int, float, bool, None), "
        f"found a {type(value).__name__}"
    )


def write_checkpoint(path: str | Path, header: Mapping[str, Any], state: Mapping[str, torch.Tensor], *,
                     format: str | None = None) -> Path:  # noqa: A002 - the natural name for the file format
    """Write a checkpoint (``header`` = everything but the tensors, plain data) atomically; returns the path.

    ``format`` defaults to ``"safetensors"`` for a ``.safetensors`` suffix, else ``"pt"``; with ``"safetensors"``
    the suffix becomes ``.safetensors``.
    """
    path = Path(path).expanduser()
    fmt = format or ("safetensors" if path.suffix == SAFETENSORS_SUFFIX else "pt")
    if fmt not in ("pt", "safetensors"):
        raise ValueError(f"write_checkpoint: format must be 'pt' or 'safetensors', got {fmt!r}")
    if fmt == "safetensors" and path.suffix != SAFETENSORS_SUFFIX:
        path = path.with_name(path.name + SAFETENSORS_SUFFIX) if path.suffix != ".pt" else path.with_suffix(
            SAFETENSORS_SUFFIX
        )
    header = {"format": FORMAT, "version": VERSION, **header}
    if fmt == "pt":
        return atomic_save({**header, "state_dict": dict(state)}, path)

    from safetensors.torch import save as safetensors_bytes

    # safetensors refuses tensors that share memory or are not contiguous: give each its own copy.
    seen: set[int] = set()
    tensors = {}
    for k, v in state.items():
        v = v.contiguous()
        if v.untyped_storage().data_ptr() in seen and v.numel() > 0:
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        tensors[k] = v
    payload = safetensors_bytes(tensors, metadata={"format": "pt", _SAFETENSORS_KEY: json.dumps(header)})
    return atomic_write_bytes(path, payload)


def read_checkpoint_info(path: str | Path) -> CheckpointInfo:
    """Model name, build args, classes, normalisation, config and meta of a checkpoint (no model is built)."""
    path = Path(path).expanduser()
    if path.suffix == SAFETENSORS_SUFFIX:
        return CheckpointInfo.from_checkpoint(_read_safetensors_header(path), path=path)
    # mmap: the tensors are not read into memory just to look at the metadata.
    return CheckpointInfo.from_checkpoint(safe_load(path, mmap=True), path=path)


def peek_checkpoint_info(path: str | Path) -> CheckpointInfo | None:
    """The info of an sfdaseg checkpoint file, or ``None`` for any other readable file (a foreign state dict)."""
    path = Path(path).expanduser()
    if path.suffix == SAFETENSORS_SUFFIX:
        header = _read_safetensors_header(path, required=False)
        return CheckpointInfo.from_checkpoint(header, path=path) if header is not None else None
    obj = safe_load(path, mmap=True)
    return CheckpointInfo.from_checkpoint(obj, path=path) if is_sfdaseg_checkpoint(obj) else None


def _read_safetensors_header(path: Path, *, required: bool = True) -> dict | None:
    from safetensors import safe_open

    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read checkpoint {path}: {_first_line(e)}") from e
    if _SAFETENSORS_KEY not in metadata:
        if not required:
            return None
        raise CheckpointError(f"{path} is a safetensors file without sfdaseg metadata (a plain state dict?)")
    return {**_safetensors_header(path, metadata), "state_dict": {}}


def _safetensors_header(path: Path, metadata: Mapping[str, str]) -> dict:
    """The sfdaseg metadata stored as JSON in a safetensors header."""
    try:
        header = json.loads(metadata[_SAFETENSORS_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{path}: the sfdaseg metadata in the safetensors header is not valid JSON: {e}"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the sfdaseg metadata in the safetensors header is not a JSON object")
    return header
