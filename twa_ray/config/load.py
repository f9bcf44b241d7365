"""A config from YAML or a dict, with ``a.b=value`` overrides, typed and validated.

    cfg = load_config("configs/quickstart.yaml", ["twa.bits=4", "train.epochs=3"])

Unknown keys, wrong types and invalid values are collected and raised together as one
``ConfigError`` naming the file (or override) and the dotted key of each problem. A float
setting takes every notation ``float()`` reads (``1e-4``, which YAML 1.1 reads as a string,
``5E-4``, ``.5``, ``1_000``); an int setting takes integers only. ``name`` is a plain name
(``is_plain_name``): it makes the default run folder runs/<name>.

Locations are loaded as written; a job settles them (``locations.settle_locations``).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Sequence

import yaml

from .schema import Config, ConfigError
from .validate import config_problems


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def as_float(value: Any) -> float | None:
    """``value`` as a float field takes it, else None: an int (not a bool), a float, or a
    string in any notation ``float()`` accepts (``1e-4``, ``5E-4``, ``.5``, ``1_000``). YAML 1.1
    (PyYAML) reads a number without a dot, such as ``1e-4``, as a string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _convert(value: Any, tp: Any, key: str, errors: list[str], where: str) -> Any:
    """``value`` as the type ``tp`` of ``key`` (errors appended, naming the key). A float
    field takes every notation ``float()`` accepts (``as_float``), never a bool; an int
    field takes only integers (YAML already reads ``1_000`` and ``0x10`` as ints), never a
    float or a string."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) == 1:  # X | None: X's own errors name the key inside
            return _convert(value, others[0], key, errors, where)
        for arg in (a for a in args if a is not type(None)):
            sub: list[str] = []
            out = _convert(value, arg, key, sub, where)
            if not sub:
                return out
        errors.append(f"{where}: {key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
        return None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{where}: {key}: expected a mapping, got {value!r}")
            return tp()
        return build(tp, value, key + ".", errors, where)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            errors.append(f"{where}: {key}: expected a list, got {value!r}")
            return []
        return [_convert(v, item, f"{key}[{i}]", errors, where) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            errors.append(f"{where}: {key}: expected a mapping, got {value!r}")
            return {}
        return value
    if tp is Any:
        return value
    if tp is float:
        number = as_float(value)
        if number is None:
            errors.append(f"{where}: {key}: expected float, got {value!r}")
        return number
    if tp is bool and not isinstance(value, bool):
        errors.append(f"{where}: {key}: expected true or false, got {value!r}")
        return None
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        errors.append(f"{where}: {key}: expected an integer, got {value!r}")
        return None
    if not isinstance(value, tp):
        errors.append(f"{where}: {key}: expected {_type_name(tp)}, got {value!r}")
        return None
    return value


def build(cls: type, raw: dict, prefix: str, errors: list[str], where: str) -> Any:
    """The dataclass ``cls`` from ``raw``, its fields typed (``_convert``); every unknown key
    and wrong type is appended to ``errors`` (``<where>: <prefix><key>: ...``), not raised.
    No validation beyond types (``validate.config_problems``)."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            errors.append(f"{where}: unknown key {prefix}{key} (valid: {', '.join(sorted(names))})")
            continue
        kwargs[key] = _convert(value, hints[key], prefix + key, errors, where)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        errors.append(f"{where}: {prefix.rstrip('.') or 'config'}: {exc}")
        return cls()


def _apply_override(raw: dict, override: str, errors: list[str]) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key:
        errors.append(f"override {override!r}: expected KEY=VALUE, e.g. twa.bits=4")
        return
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        errors.append(f"override {override!r}: value is not YAML: {exc}")
        return
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part, {}), dict):
            errors.append(f"override {override!r}: {part} is not a section")
            return
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def config_from_dict(raw: dict, where: str = "config", overrides: Sequence[str] = ()) -> Config:
    """Build and validate a Config from a plain dict (and overrides)."""
    raw = dict(raw or {})
    errors: list[str] = []
    for override in overrides:
        _apply_override(raw, override, errors)
    cfg = build(Config, raw, "", errors, where)
    if not errors:
        errors += config_problems(cfg, where)
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config; ``name`` defaults to the file's stem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    raw.setdefault("name", path.stem)
    return config_from_dict(raw, str(path), overrides)
