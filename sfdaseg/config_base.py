"""Typed configs, the generic machinery: dataclasses, YAML files, ``key=value`` overrides and validation.

A config is a dataclass of sections (themselves dataclasses of plain fields). Loading goes
``defaults -> YAML file -> command-line shortcut flags -> key=value overrides``; every key is checked against the
dataclass fields, every value against the field's type and choices, and errors name the key, where it came from
(the file, or "command line") and what is accepted, with a close-match suggestion for typos. Then the loader
calls ``validate()`` of every section that has one, innermost first, once: that is where ranges are checked
(thresholds in [0, 1], positive sizes, ...), and nowhere else.

Only plain types appear in configs (bool, int, float, str, None, lists/tuples of those, string-keyed dicts), so a
resolved config is YAML- and checkpoint-safe (``torch.load(weights_only=True)`` can read it back).

This module is a leaf: it imports nothing from sfdaseg, so every layer may use it (the command configs in
:mod:`sfdaseg.config`, recipe configs in :mod:`sfdaseg.methods`, component configs such as the strong view).
"""

from __future__ import annotations

import difflib
import types
import typing
from dataclasses import MISSING, field, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, Sequence, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T")

__all__ = [
    "ConfigError", "ORIGINS", "Section", "check_param", "choices", "describe_range", "param", "from_dict", "load_config", "load_yaml", "merge", "nest", "parse_override",
    "positive", "suggest", "to_dict", "type_name", "to_yaml", "validate_tree",
]


ORIGINS = ("published", "reconstructed", "ours")


class Section:
    """Optional base of a config dataclass whose fields are declared with :func:`param` / :func:`choices`.

    ``validate()`` checks every field against its declared range (``ge``/``gt``/``le``/``lt``, elementwise for
    lists), choices and non-emptiness, with an error naming ``key_prefix + name`` and what is accepted; subclasses
    add cross-field checks and call ``super().validate()`` first (mixins cooperate through it).
    """

    key_prefix: ClassVar[str] = ""

    def validate(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            check_param(self.key_prefix + f.name, getattr(self, f.name), f.metadata)


def param(default: Any = MISSING, *, default_factory: Any = MISSING, ge: float | None = None,
          gt: float | None = None, le: float | None = None, lt: float | None = None, nonempty: bool = False,
          origin: str = "ours", help: str = "") -> Any:
    """A config field with its accepted range, checked by :meth:`Section.validate`.

    ``origin`` says where its default comes from: ``"published"`` (a paper or its official code),
    ``"reconstructed"`` (the mechanism is published, the value is our design) or ``"ours"``; ``sfdaseg adapt
    --recipe R --help`` lists it.
    """
    if origin not in ORIGINS:
        raise ValueError(f"param: origin must be one of {ORIGINS}, got {origin!r}")
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "nonempty": nonempty, "origin": origin, "help": help}
    kw = {"default": default} if default is not MISSING else {}
    if default_factory is not MISSING:
        kw = {"default_factory": default_factory}
    return field(metadata=meta, **kw)


def describe_range(meta: Mapping[str, Any]) -> str:
    """``[0, 1]``, ``> 0``, ``(0, 100]``, ... from a field's metadata ("" when it declares none)."""
    if meta.get("choices") is not None:
        return " | ".join(map(str, meta["choices"]))
    lo = ("[", meta["ge"]) if meta.get("ge") is not None else ("(", meta["gt"]) if meta.get("gt") is not None else None
    hi = ("]", meta["le"]) if meta.get("le") is not None else (")", meta["lt"]) if meta.get("lt") is not None else None
    if lo and hi:
        return f"{lo[0]}{lo[1]:g}, {hi[1]:g}{hi[0]}"
    if lo:
        return f"{'>=' if lo[0] == '[' else '>'} {lo[1]:g}"
    if hi:
        return f"{'<=' if hi[0] == ']' else '<'} {hi[1]:g}"
    return "non-empty" if meta.get("nonempty") else ""


def check_param(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` naming ``key`` when ``value`` is outside the declared range of ``meta``."""
    if value is None:
        return
    if meta.get("nonempty") and isinstance(value, (list, tuple, dict)) and not value:
        raise ConfigError(f"{key}: expected a non-empty list, got {list(value)!r}")
    values = value if isinstance(value, (list, tuple)) else [value]
    bounds = [(meta.get("ge"), lambda v, b: v >= b), (meta.get("gt"), lambda v, b: v > b),
              (meta.get("le"), lambda v, b: v <= b), (meta.get("lt"), lambda v, b: v < b)]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        for bound, ok in bounds:
            if bound is not None and not ok(v, bound):
                raise ConfigError(f"{key}: expected a value in {describe_range(meta)}, got {value!r}")


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key, its source and what is accepted."""


def choices(*values: Any, default: Any = MISSING, help: str = "", origin: str = "ours") -> Any:
    """A field restricted to ``values`` (checked on load); ``origin`` as in :func:`param`."""
    kw = {} if default is MISSING else {"default": default}
    return field(metadata={"choices": tuple(values), "help": help, "origin": origin}, **kw)


def suggest(key: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(options), n=3, cutoff=0.6)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        inner = type_name(args[0]) if args else "any"
        return f"list of {inner}"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against type ``tp`` and return it in canonical form; raise ConfigError otherwise."""
    origin = get_origin(tp)
    bad = ConfigError(f"{key}: expected {type_name(tp)}, got {value!r} ({type(value).__name__}) in {source}")
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, source)
            except ConfigError:
                pass  # try the next member; the error names the whole union
        raise bad
    if origin is Literal:
        if value in get_args(tp):
            return value
        opts = [str(a) for a in get_args(tp)]
        raise ConfigError(
            f"{key}: {value!r} is not one of {', '.join(opts)} (in {source}).{suggest(str(value), opts)}"
        )
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise bad
        args = [a for a in get_args(tp) if a is not Ellipsis]
        if origin is tuple and args and Ellipsis not in get_args(tp) and len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)} ({value!r}) in {source}")
        if origin is tuple and len(args) > 1 and Ellipsis not in get_args(tp):
            return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, Mapping):
            raise bad
        return {str(k): v for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise bad


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: Mapping[str, Any] | None, *, source: str = "defaults", prefix: str = "",
              validate: bool = True) -> T:
    """Build dataclass ``cls`` from a nested mapping, checking keys and types; then :func:`validate_tree` it.

    ``validate=False`` checks keys and types only (a partial layer of a config, whose required values may come
    from a later layer).
    """
    cfg = _build(cls, data, source=source, prefix=prefix)
    if validate:
        validate_tree(cfg)
    return cfg


def _field_default(f: Any) -> Any:
    """The default instance of a dataclass-typed field (its factory's product), or ``None`` when it has none."""
    if f.default_factory is not MISSING:
        return f.default_factory()
    if f.default is not MISSING and is_dataclass(f.default):
        return f.default
    return None


def _build(cls: type[T], data: Mapping[str, Any] | None, *, source: str, prefix: str) -> T:
    data = dict(data or {})
    hints = _hints(cls)
    names = [f.name for f in fields(cls)]
    for key in data:
        if key not in names:
            where = f"section '{prefix[:-1]}'" if prefix else "the top level"
            raise ConfigError(
                f"unknown key '{prefix}{key}' in {source}; accepted keys of {where}: {', '.join(names)}."
                f"{suggest(key, names)}"
            )
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        value = data[f.name]
        full = f"{prefix}{f.name}"
        if is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{full}: expected a mapping (a section), got {value!r} in {source}")
            # A partial section starts from the parent's own default for it, not from the section class's
            # defaults: `optim.lr=1e-5` on an adapt config keeps adapt's head LR x1 and weight decay.
            default = _field_default(f)
            if default is not None:
                value = merge(to_dict(default), value)
            kwargs[f.name] = _build(tp, value, source=source, prefix=f"{full}.")
        else:
            value = _coerce(value, tp, full, source)
            opts = f.metadata.get("choices")
            if opts is not None and value not in opts:
                raise ConfigError(
                    f"{full}: {value!r} is not one of {', '.join(map(str, opts))} (in {source})."
                    f"{suggest(str(value), [str(o) for o in opts])}"
                )
            kwargs[f.name] = value
    return cls(**kwargs)


def validate_tree(cfg: Any) -> None:
    """Call ``validate()`` of every dataclass in ``cfg``, sections first, then ``cfg`` itself.

    A ``ValueError`` that is not a :class:`ConfigError` (e.g. from a component's own check) becomes one, so the
    command line reports it as bad input.
    """
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value) and not isinstance(value, type):
            validate_tree(value)
    check = getattr(cfg, "validate", None)
    if check is None:
        return
    try:
        check()
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain nested dict (lists instead of tuples), safe for YAML and weights-only checkpoints."""

    def plain(v: Any) -> Any:
        if is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: ``update`` wins; sections merge key by key."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=1e-4"`` -> ``("optim.lr", 1e-4)``; the value is parsed as YAML (so ``[1, 2]``, ``null``, ``true``)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value, e.g. optim.lr=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads "1e-4" as a string (YAML 1.1 needs a dot); accept it as the number users mean.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value.lower() for c in ".e") and value.strip() else value
        except ValueError:
            pass
    return key, value


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        d = out
        for p in parts[:-1]:
            nxt = d.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{key}': '{p}' is a value, not a section")
            d = nxt
        d[parts[-1]] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def load_config(
    cls: type[T],
    *,
    file: str | Path | None = None,
    flags: Mapping[str, Any] | None = None,
    overrides: Sequence[str] = (),
) -> T:
    """Defaults, then ``file``, then shortcut ``flags`` (dotted keys), then ``key=value`` overrides; validated once.

    Each layer's keys and types are checked on their own, so an error names the layer it came from; the merged
    config is then validated (:func:`validate_tree`).
    """
    data: dict[str, Any] = {}
    if file is not None:
        layer = load_yaml(file)
        from_dict(cls, layer, source=str(file), validate=False)  # checks keys and types, naming the file
        data = merge(data, layer)
    if flags:
        layer = nest({k: v for k, v in flags.items() if v is not None})
        from_dict(cls, layer, source="command-line flags", validate=False)
        data = merge(data, layer)
    if overrides:
        layer = nest(dict(parse_override(o) for o in overrides))
        from_dict(cls, layer, source="command-line overrides", validate=False)
        data = merge(data, layer)
    cfg = from_dict(cls, data, source=str(file) if file else "command line", validate=False)
    try:
        validate_tree(cfg)
    except ConfigError as e:
        where = f" (config: {file})" if file else ""
        raise ConfigError(f"{e}{where}") from None
    return cfg


def to_yaml(cfg: Any, *, header: str | None = None) -> str:
    """The YAML text of a config (plain data), with ``header`` lines as ``#`` comments on top."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if header:
        text = "".join(f"# {line}\n" for line in header.splitlines()) + text
    return text


def positive(key: str, value: float) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``value > 0``."""
    if value <= 0:
        raise ConfigError(f"{key}: expected a positive value, got {value}")
