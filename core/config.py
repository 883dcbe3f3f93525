"""Strict TOML presets loaded into frozen dataclasses.

A preset is a small TOML file next to the code that uses it. Loading is strict: a key that
the dataclass does not have is an error naming the key and the file, so a misspelt field
never silently keeps its default. Overrides from the command line (`--set key=value`) go
through the same path, with the value parsed as TOML.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A preset or override that does not fit its dataclass."""


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting lists to tuples and ints to floats."""
    origin = typing.get_origin(tp)
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} fits none of {tp}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {typing.get_args(tp)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from `data`, rejecting keys it does not have."""
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r} for {cls.__name__} "
            f"(known keys: {', '.join(sorted(types_))})"
        )
    kwargs = {k: _coerce(v, types_[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field without a default is missing
        raise ConfigError(f"{where}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """The dataclass as plain dicts and lists (None fields dropped, TOML has no null)."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if v is None:
            continue
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def _parse_value(text: str) -> Any:
    """A command-line value as TOML (`3`, `1e-4`, `true`, `[1, 2]`, `"x"`), else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(cfg: T, overrides: list[str] | tuple[str, ...]) -> T:
    """Return `cfg` with `key=value` (dotted keys for nested tables) overrides applied strictly."""
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, text = item.split("=", 1)
        path = key.strip().split(".")
        node = data
        node_cls: Any = type(cfg)
        for part in path[:-1]:
            sub = _field_types(node_cls).get(part)
            if not _is_dataclass_type(sub):
                raise ConfigError(f"--set {key}: {part!r} is not a table of {node_cls.__name__}")
            node = node.setdefault(part, {})
            node_cls = sub
        if path[-1] not in _field_types(node_cls):
            raise ConfigError(
                f"--set {key}: unknown key {path[-1]!r} for {node_cls.__name__} "
                f"(known keys: {', '.join(sorted(_field_types(node_cls)))})"
            )
        node[path[-1]] = _parse_value(text.strip())
    return from_dict(type(cfg), data, "--set")


def load_toml(cls: type[T], path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> T:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    cfg = from_dict(cls, data, str(path))
    return apply_overrides(cfg, overrides) if overrides else cfg


def load_preset(cls: type[T], package_dir: str | Path, name: str,
                overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Load preset `name` from `<package_dir>/presets/<name>.toml` (or a path to a .toml file)."""
    candidate = Path(name)
    if candidate.suffix == ".toml" and candidate.exists():
        return load_toml(cls, candidate, overrides)
    presets = Path(package_dir) / "presets"
    path = presets / f"{name}.toml"
    if not path.exists():
        known = sorted(p.stem for p in presets.glob("*.toml"))
        raise ConfigError(f"unknown preset {name!r} (known presets: {', '.join(known)}; "
                          "or give a path to a .toml file)")
    return load_toml(cls, path, overrides)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise ConfigError(f"cannot write {v!r} to TOML")


def dumps_toml(data: dict[str, Any]) -> str:
    """Write a dict of scalars, lists and nested tables as TOML (enough for our configs)."""
    lines, tables = [], []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append((k, v))
        elif v is not None:
            lines.append(f"{k} = {_toml_value(v)}")
    out = "\n".join(lines)
    for name, table in tables:
        body = dumps_toml(table)
        # nested tables inside `table` come out as [sub]; qualify them as [name.sub]
        body = "\n".join(f"[{name}.{ln[1:]}" if ln.startswith("[") else ln for ln in body.split("\n"))
        out += f"\n\n[{name}]\n{body}"
    return out.strip() + "\n"
