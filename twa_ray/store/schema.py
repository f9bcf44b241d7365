"""The store's schema: ``store.json`` (format, parameter names, shapes, dtypes, free meta),
built and checked here, and the names of the files in a store folder.

Layout of a store directory (on any ``pyarrow.fs`` filesystem)::

    store.json                      metadata, written once (temp name + move)
    candidates/cand-000000.arrow    one Arrow IPC file per candidate (one row)
    candidates/cand-000001.arrow
    ...
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["STORE_FORMAT", "STORE_FORMAT_VERSION", "METADATA_FILE", "CANDIDATE_DIR", "CandidateInfo",
           "candidate_file_name", "build_metadata", "metadata_problem", "parameter_mismatch", "json_dumps"]

STORE_FORMAT = "twa_ray.candidate_store"
STORE_FORMAT_VERSION = 1
METADATA_FILE = "store.json"
CANDIDATE_DIR = "candidates"
CANDIDATE_RE = re.compile(r"^cand-(\d+)\.arrow$")
MAX_NUMEL = 2**31 - 1  # Arrow fixed_size_list size is int32


def candidate_file_name(index: int) -> str:
    """File name of candidate ``index`` (``cand-{index:06d}.arrow``)."""
    return f"cand-{index:06d}.arrow"


@dataclass(frozen=True)
class CandidateInfo:
    """A complete candidate in the store (from its file footer; no weights read).

    Attributes:
        index: the candidate's index (from its file name).
        path: the candidate file's path inside the store's filesystem.
        info: the info dict stored with the candidate (epoch, step, metrics, source...).
    """

    index: int
    path: str
    info: dict = field(default_factory=dict)


def dtype_name(dtype: Any) -> str:
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    if isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic)):
        return np.dtype(dtype).name
    if isinstance(dtype, str) and dtype:
        return dtype.removeprefix("torch.")
    raise TypeError(f"dtype must be a torch.dtype or a string, got {dtype!r}")


def json_dumps(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, sort_keys=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be JSON-serialisable: {exc}") from exc


def build_metadata(names, shapes, dtypes, meta) -> dict:
    """The ``store.json`` dict of a new store (arguments as for ``CandidateStore.create``);
    TypeError / ValueError for inconsistent ones."""
    names = list(names)
    if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
        raise TypeError("names must be a sequence of non-empty strings")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"duplicate parameter names: {dup}")
    shapes = [[int(d) for d in s] for s in shapes]
    if len(shapes) != len(names):
        raise ValueError(f"got {len(names)} names but {len(shapes)} shapes")
    for n, s in zip(names, shapes):
        numel = math.prod(s)
        if any(d < 0 for d in s) or numel == 0:
            raise ValueError(f"parameter {n!r}: shape {s} has no elements; cannot store it")
        if numel > MAX_NUMEL:
            raise ValueError(f"parameter {n!r}: {numel} elements exceed the Arrow limit of {MAX_NUMEL} per column")
    if dtypes is None:
        dtypes = ["float32"] * len(names)
    dtypes = [dtype_name(d) for d in dtypes]
    if len(dtypes) != len(names):
        raise ValueError(f"got {len(names)} names but {len(dtypes)} dtypes")
    meta = dict(meta or {})
    json_dumps(meta, "meta")
    return {
        "format": STORE_FORMAT,
        "version": STORE_FORMAT_VERSION,
        "names": names,
        "shapes": shapes,
        "dtypes": dtypes,
        "meta": meta,
    }


def metadata_problem(md: Any) -> str | None:
    """Why a parsed store.json is unusable, or None if it is fine."""
    if not isinstance(md, dict):
        return "not a JSON object"
    if md.get("format") != STORE_FORMAT:
        return f"'format' is {md.get('format')!r}, expected {STORE_FORMAT!r}"
    version = md.get("version")
    if not isinstance(version, int) or version > STORE_FORMAT_VERSION or version < 1:
        return f"unsupported version {version!r} (this code reads up to {STORE_FORMAT_VERSION})"
    names, shapes, dtypes = md.get("names"), md.get("shapes"), md.get("dtypes")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return "'names' must be a list of strings"
    if not isinstance(shapes, list) or not all(
        isinstance(s, list) and all(isinstance(d, int) and d > 0 for d in s) for s in shapes
    ):
        return "'shapes' must be a list of lists of positive integers"
    if not isinstance(dtypes, list) or not all(isinstance(d, str) for d in dtypes):
        return "'dtypes' must be a list of strings"
    if not len(names) == len(shapes) == len(dtypes):
        return f"{len(names)} names, {len(shapes)} shapes and {len(dtypes)} dtypes"
    if len(set(names)) != len(names):
        return "duplicate parameter names"
    if not isinstance(md.get("meta", {}), dict):
        return "'meta' must be a JSON object"
    return None


def parameter_mismatch(
    names: Sequence[str], shapes: Sequence[Sequence[int]], other_names: Sequence[str],
    other_shapes: Sequence[Sequence[int]], label: str = "store", other_label: str = "model",
) -> str | None:
    """How two parameter lists (names in order, and their shapes) differ, naming the first
    difference; None when they agree. ``label`` / ``other_label`` name the two sides."""
    names, other_names = list(names), list(other_names)
    if names != other_names:
        only = [n for n in names if n not in other_names]
        other_only = [n for n in other_names if n not in names]
        if not (only or other_only):
            return "same parameter names in a different order"
        return f"parameters differ: {label} only {only}, {other_label} only {other_only}"
    for name, a, b in zip(names, shapes, other_shapes):
        if tuple(a) != tuple(b):
            return f"parameter {name!r}: {label} shape {list(a)}, {other_label} shape {list(b)}"
    return None
