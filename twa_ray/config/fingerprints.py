"""Same settings? A config as a plain dict, compared with one recorded earlier (a store's
meta, a run folder's config.json), and hashed into deterministic run names.

Locations (``LOCATION_KEYS``: where results and data are, not what they hold) are settled
to absolute paths in the driver (``locations.settle_locations``), so they depend on where a
job runs; ``without_locations`` leaves them out of a comparison: a moved run folder or
dataset, or another copy of a ``ray job submit`` working dir, holds the same settings.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import types
import typing
from typing import Any, Mapping, Sequence

from .load import build
from .schema import Config

LOCATION_KEYS = ("output_dir", "storage_root", "data.root")  # where results and data are, not what they hold


def config_to_dict(cfg: Config) -> dict:
    """``cfg`` as plain data (JSON-able, sections in field order); ``config_from_dict`` of
    it is an equal config, settled locations included."""
    return dataclasses.asdict(cfg)


def recorded_config(raw: dict) -> dict:
    """A config dict an earlier run recorded (a store's meta, a run folder's config.json),
    with the keys added since at their defaults, so that it compares equal to the same
    settings today (a new key such as ``train.sharding`` must not make every earlier store
    "made with other settings"). A dict that no longer builds (a key since removed) comes
    back as it was: it differs, as it should."""
    errors: list[str] = []
    cfg = build(Config, dict(raw or {}), "", errors, "recorded config")
    return raw if errors else config_to_dict(cfg)


def without_locations(raw: Mapping[str, Any]) -> Any:
    """A copy of a config dict (or of some of its sections) without ``LOCATION_KEYS``;
    anything but a mapping (a malformed record) as it is."""
    if not isinstance(raw, Mapping):
        return raw
    out = copy.deepcopy(dict(raw))
    for key in LOCATION_KEYS:
        *sections, name = key.split(".")
        node = out
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(name, None)
    return out


_ABSENT = object()


def _as_json(settings: Any) -> Any:
    """``settings`` as it reads back from a JSON file (tuples become lists)."""
    return json.loads(json.dumps(settings, sort_keys=True))


def differing_settings(recorded: Any, wanted: Any, keys: Sequence[str] | None = None) -> list[str]:
    """The keys whose values differ between ``recorded`` settings (read back from a file or a
    store's meta) and ``wanted`` ones (e.g. sections of ``config_to_dict(cfg)``), compared as
    JSON; [] means the same settings. ``keys``: those to compare (default: every key of either)."""
    recorded = _as_json(recorded) if isinstance(recorded, dict) else {}
    wanted = _as_json(wanted)
    keys = sorted(set(recorded) | set(wanted)) if keys is None else list(keys)
    return [k for k in keys if recorded.get(k, _ABSENT) != wanted.get(k, _ABSENT)]


def _section_type(tp: Any) -> type | None:
    """The dataclass of a config field's type (``TrainConfig``, ``FinetuneConfig | None``), or None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), None)
    return None


def dotted_settings(raw: Mapping[str, Any], cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """A config dict (``config_to_dict``) as {dotted key: value}, one entry per setting:
    sections (``train``, ``tune.asha``) are opened, a mapping setting (``tune.space``,
    ``model.kwargs``) is one value, keys the schema does not know are kept as they are.
    ``differing_settings`` of two of them names the settings that differ (``twa.lr``)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        section = _section_type(hints.get(key))
        if section is not None and isinstance(value, Mapping):
            out.update(dotted_settings(value, section, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def settings_fingerprint(settings: dict) -> str:
    """10 hex digits that change with any of ``settings`` (JSON-able): deterministic run names."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
