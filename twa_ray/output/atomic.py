"""Atomic file writers: every file goes to a temporary name and is renamed into place.

A writer killed mid-way leaves the previous version of the file intact (``os.replace``
is atomic on POSIX filesystems).
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are ordinary files
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_torch(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def write_rows(path: str | Path, rows: Sequence[dict]) -> None:
    """A list of flat dicts -> a parquet table (missing keys become nulls)."""
    columns: dict[str, list] = {}
    for row in rows:
        for key in row:
            columns.setdefault(key, [])
    table = pa.table({k: [row.get(k) for row in rows] for k in columns}) if rows else pa.table({})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_rows(path: str | Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())
