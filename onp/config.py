"""Configuration helpers: YAML files, ``--set key=value`` overrides, and stable hashing."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterable, Mapping, Optional, Type, TypeVar

import yaml

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


def load_yaml(path: Path) -> Dict[str, Any]:
    """Read a YAML mapping; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a mapping of keys to values")
    return data


def parse_overrides(items: Optional[Iterable[str]]) -> Dict[str, Any]:
    """``["a.b=3", "name=x"]`` -> ``{"a": {"b": 3}, "name": "x"}``; values are parsed as YAML scalars."""
    out: Dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out


def deep_update(base: Dict[str, Any], update: Mapping[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_update(out[k], v)
        else:
            out[k] = v
    return out


def from_dict(cls: Type[T], data: Mapping[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys with the list of valid ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {where} key(s) {unknown}; valid keys: {', '.join(sorted(names))}")
    return cls(**data)


def stable_hash(obj: Any, length: int = 12) -> str:
    """A short SHA-256 of the canonical JSON of ``obj``."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


class ConfigError(ValueError):
    """A config value of the wrong type or out of range, or an unknown key; the message names it."""


def check_finite(obj: Any, where: str = "") -> Any:
    """``obj`` unchanged if every number nested in it is finite; else :class:`ValueError`."""
    if isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"{where or 'value'} must be a finite number; got {obj}")
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            check_finite(v, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_finite(v, f"{where}[{i}]")
    return obj


def validation_message(exc: Any, what: str) -> str:
    """One readable line per problem of a pydantic ``ValidationError``: key, what is wrong, the value."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if not str(p).startswith("function-"))
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown key"
        value = err.get("input")
        shown = "" if err.get("type") in ("missing",) or isinstance(value, (dict, list)) else f" (got {value!r})"
        if loc and msg.startswith(f"{loc}."):  # a nested check already named the key
            lines.append(f"{what} key {msg}")
        else:
            lines.append(f"{what} key {loc or '(top level)'}: {msg}{shown}")
    return "; ".join(lines)


_SCHEMAS: Dict[type, Any] = {}


def check_types(obj: Any, what: str) -> None:
    """Check every field of dataclass ``obj`` against its type hint (strictly: no ``"3"`` for an
    int, no float for an int, no NaN or infinity); :class:`ConfigError` names the field."""
    import typing

    from pydantic import ConfigDict, ValidationError, create_model

    cls = type(obj)
    if cls not in _SCHEMAS:
        hints = typing.get_type_hints(cls)
        fields: Dict[str, Any] = {f.name: (hints[f.name], ...) for f in dataclasses.fields(cls)}
        _SCHEMAS[cls] = create_model(
            cls.__name__, __config__=ConfigDict(strict=True, allow_inf_nan=False, extra="forbid"), **fields
        )
    try:
        _SCHEMAS[cls].model_validate({f.name: getattr(obj, f.name) for f in dataclasses.fields(cls)})
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, what)) from None
    for f in dataclasses.fields(cls):
        check_finite(getattr(obj, f.name), f"{what} key {f.name}")
