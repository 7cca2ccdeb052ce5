"""Typed configuration: dataclasses loaded from YAML and validated on load.

Every config is a (possibly nested) frozen dataclass. ``load_config(path, cls)`` reads YAML, rejects unknown keys,
checks types and ranges, and raises one :class:`ConfigError` naming the file and the dotted key at fault.
Range checks live next to each field as ``field(metadata={"check": (predicate, "message")})``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


def _check(pred, msg: str):
    return {"check": (pred, msg)}


POSITIVE = _check(lambda v: v > 0, "must be > 0")
NON_NEGATIVE = _check(lambda v: v >= 0, "must be >= 0")
PERCENT = _check(lambda v: 0 <= v <= 100, "must be a percentile in [0, 100]")
FRACTION = _check(lambda v: 0 < v <= 1, "must be in (0, 1]")


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _convert(value: Any, tp: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: key '{key}': {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: key '{key}': {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: key '{key}': expected a list, got {type(value).__name__} {value!r}")
        item_tp = args[0] if args else Any
        return tuple(_convert(v, item_tp, f"{key}[{i}]", where) for i, v in enumerate(value))
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key '{key}': expected a mapping, got {type(value).__name__}")
        return _from_dict(tp, value, where, prefix=f"{key}.")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: key '{key}': expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: key '{key}': expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: key '{key}': expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: key '{key}': expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"{where}: key '{key}': unsupported type {tp}")


def _from_dict(cls: type[T], data: dict, where: str, prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key '{prefix}{unknown[0]}' (allowed under '{prefix or '<top>'}': {sorted(fields)})"
        )
    missing = [n for n, f in fields.items() if n not in data and f.init and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing required key '{prefix}{missing[0]}'")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        converted = _convert(value, hints[name], key, where)
        check = fields[name].metadata.get("check")
        if check is not None and converted is not None:
            pred, msg = check
            if not pred(converted):
                raise ConfigError(f"{where}: key '{key}': {value!r} {msg}")
        kwargs[name] = converted
    try:
        obj = cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except ValueError as e:  # cross-field checks in __post_init__ name their keys
        raise ConfigError(f"{where}: {prefix}{e}" if prefix and not str(e).startswith(prefix) else f"{where}: {e}") from None
    return obj


def from_dict(cls: type[T], data: dict | None, where: str = "<dict>") -> T:
    """Build a config dataclass from a plain dict, validating keys, types and ranges."""
    return _from_dict(cls, data or {}, where)


def load_config(path: str | Path, cls: type[T]) -> T:
    """Load a YAML file into config class ``cls``; raise ConfigError naming the file and key on bad input."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return from_dict(cls, data, where=str(path))


def to_dict(cfg: Any) -> dict:
    """Plain dict (lists for tuples) of a config dataclass, for YAML/JSON output."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_hash(*parts: Any, length: int = 16) -> str:
    """Stable hash of configs / plain values, used to key caches."""
    blob = json.dumps(
        [to_dict(p) if dataclasses.is_dataclass(p) else p for p in parts], sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def override(cfg: T, dotted: dict[str, Any]) -> T:
    """Return a copy of ``cfg`` with dotted keys replaced (validated like a YAML value)."""
    data = to_dict(cfg)
    for key, value in dotted.items():
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            if p not in node or not isinstance(node[p], dict):
                raise ConfigError(f"override: unknown key '{key}'")
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(f"override: unknown key '{key}'")
        node[parts[-1]] = value
    return from_dict(type(cfg), data, where="override")


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


__all__ = [
    "ConfigError", "from_dict", "load_config", "to_dict", "config_hash", "override", "save_config",
    "POSITIVE", "NON_NEGATIVE", "PERCENT", "FRACTION", "dataclass", "field",
]
