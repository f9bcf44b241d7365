"""Atomic file writers of the run folder: a reader sees the previous version of a file or
the whole new one, never a part, and a writer killed mid-way leaves the previous one intact.

Every function takes a local path (``str`` or ``Path``) or any URI pyarrow opens
(``s3://bucket/run/summary.json``, ``file:///...``; ``store.fs``):

- a local path is written to a temporary file beside it, then renamed (``os.replace``
  is atomic on POSIX filesystems) by ``store.fs.commit_local``, which fsyncs the file
  before and its folder after, so a power loss cannot leave it empty; large files
  stream to disk;
- a URI's file is rendered to bytes in memory first, then written with
  ``store.fs.write_bytes_atomic``: one upload on an object store (an object appears
  only once complete), a temporary name and a move elsewhere.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..store import fs as store_fs


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside the local ``path``; on success it replaces ``path``
    durably (``store.fs.commit_local``: fsynced)."""
    if store_fs.is_uri(path):
        raise ValueError(f"{path}: atomic_path writes local files only (use write_with for a URI)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are ordinary files
    try:
        yield Path(tmp)
        store_fs.commit_local(tmp, path, overwrite=True)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_with(path: str | os.PathLike, fill: Callable[[BinaryIO], Any]) -> None:
    """Write the file ``path`` (local or URI) atomically; ``fill(f)`` writes its content to
    the binary file object ``f`` (``torch.save(obj, f)``, ``fig.savefig(f)``...)."""
    if store_fs.is_uri(path):
        buffer = io.BytesIO()
        fill(buffer)
        store_fs.write_file(path, buffer.getvalue())
        return
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        fill(f)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    write_with(path, lambda f: f.write(data))


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_bytes(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def write_torch(path: str | os.PathLike, obj: Any) -> None:
    write_with(path, lambda f: torch.save(obj, f))


def write_rows(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """A list of flat dicts -> a parquet table (missing keys become nulls)."""
    columns: dict[str, list] = {}
    for row in rows:
        for key in row:
            columns.setdefault(key, [])
    table = pa.table({k: [row.get(k) for row in rows] for k in columns}) if rows else pa.table({})
    write_with(path, lambda f: pq.write_table(table, f))


def read_rows(path: str | os.PathLike) -> list[dict]:
    loc = store_fs.resolve(path)
    return pq.read_table(loc.path, filesystem=loc.fs).to_pylist()


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(store_fs.read_file(path))
