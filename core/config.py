"""Strict TOML presets loaded into frozen dataclasses.

A preset is a small TOML file next to the code that uses it. Loading is strict: a key that
the dataclass does not have is an error naming the key and the file, so a misspelt field
never silently keeps its default. Overrides from the command line (`--set key=value`) go
through the same path, with the value parsed as TOML.

What the loader checks, each failure a ConfigError naming the field:
- the type of every value; a `Literal[...]` field takes only its choices;
- every float is finite (no inf or nan anywhere in a config);
- a field annotated `Annotated[int, Range(...)]` (or one of the aliases below) lies in its range;
- whatever a dataclass's `__post_init__` refuses (rules between fields) with a ConfigError.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import tomli_w

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, from PyPI, before it joined the standard library
    import tomli as tomllib

T = TypeVar("T")


class ConfigError(ValueError):
    """A preset or override that does not fit its dataclass."""


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric config field: `Annotated[int, Range(min=1)]`."""

    min: float | None = None  # lower bound (None: none)
    max: float | None = None  # upper bound (None: none)
    min_open: bool = False  # exclude `min` itself
    max_open: bool = False  # exclude `max` itself

    def __contains__(self, value: float) -> bool:
        above = self.min is None or (value > self.min if self.min_open else value >= self.min)
        below = self.max is None or (value < self.max if self.max_open else value <= self.max)
        return above and below

    def __str__(self) -> str:
        if self.min is not None and self.max is not None:
            return f"{'(' if self.min_open else '['}{self.min:g}, {self.max:g}{')' if self.max_open else ']'}"
        if self.min is not None:
            return f"{'>' if self.min_open else '>='} {self.min:g}"
        return f"{'<' if self.max_open else '<='} {self.max:g}"


# The ranges config fields share; a field with another range writes Annotated[..., Range(...)] itself.
PositiveInt = Annotated[int, Range(min=1)]  # 1, 2, ...
NonNegativeInt = Annotated[int, Range(min=0)]  # 0, 1, ...
PositiveFloat = Annotated[float, Range(min=0, min_open=True)]  # > 0
NonNegativeFloat = Annotated[float, Range(min=0)]  # >= 0
Probability = Annotated[float, Range(0, 1)]  # [0, 1]
Decay = Annotated[float, Range(0, 1, max_open=True)]  # [0, 1): an EMA or Adam beta


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls, include_extras=True)
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
    if origin is Annotated:
        base, *extras = typing.get_args(tp)
        value = _coerce(value, base, where)
        for bound in extras:
            if isinstance(bound, Range) and value not in bound:
                raise ConfigError(f"{where}: {value!r} is out of range; expected {bound}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: {value!r} fits none of {tp}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if not any(value == c and type(value) is type(c) for c in choices):  # true is not 1
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
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
        value = float(value)
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {value!r} is not a finite number")
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from `data`, rejecting keys it does not have and values that do not fit.

    Raises ConfigError naming `where` and the field: an unknown key, a value of the wrong type,
    a choice not among its Literal's, a non-finite float, a number out of its Range, or a rule
    between fields that the dataclass's `__post_init__` refuses.
    """
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r} for {cls.__name__} (known keys: {', '.join(sorted(types_))})"
        )
    # Field names join with dots ("config.toml.train.lr"); after --set, with a space ("--set train.lr").
    kwargs = {k: _coerce(v, types_[k], f"{where} {k}" if where == "--set" else f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field without a default is missing
        raise ConfigError(f"{where}: {e}") from None
    except ConfigError as e:  # a rule between fields, from __post_init__
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
    """Load dataclass `cls` from the TOML file `path`, then apply `key=value` overrides; ConfigError if either fails."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    cfg = from_dict(cls, data, str(path))
    return apply_overrides(cfg, overrides) if overrides else cfg


def load_preset(cls: type[T], package_dir: str | Path, name: str, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Load preset `name` from `<package_dir>/presets/<name>.toml` (or a path to a .toml file)."""
    candidate = Path(name)
    if candidate.suffix == ".toml" and candidate.exists():
        return load_toml(cls, candidate, overrides)
    presets = Path(package_dir) / "presets"
    path = presets / f"{name}.toml"
    if not path.exists():
        known = sorted(p.stem for p in presets.glob("*.toml"))
        raise ConfigError(
            f"unknown preset {name!r} (known presets: {', '.join(known)}; or give a path to a .toml file)"
        )
    return load_toml(cls, path, overrides)


def dumps_toml(data: dict[str, Any]) -> str:
    """`data` (scalars, lists and nested tables, e.g. `to_dict(cfg)`) as TOML text that `load_toml` reads back.

    Any string round-trips (newlines, quotes, unicode); None values are dropped, as TOML has no null.
    """

    def drop_none(d: dict[str, Any]) -> dict[str, Any]:
        return {k: drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}

    return tomli_w.dumps(drop_none(data))
