"""Filesystem helpers for the candidate store: URI resolution and atomic writes.

Everything goes through :mod:`pyarrow.fs`, so a store may live on a local disk
(plain path or ``file://`` URI) or on any filesystem pyarrow can open from a URI
(``s3://bucket/prefix``, ``gs://...``, ``hdfs://...``).
"""

from __future__ import annotations

import logging
import os
import posixpath
import uuid
from dataclasses import dataclass

import pyarrow.fs as pafs

logger = logging.getLogger(__name__)

__all__ = [
    "ResolvedLocation",
    "absolute",
    "resolve",
    "join",
    "exists",
    "list_files",
    "write_bytes_atomic",
    "move_into_place",
    "temp_name",
    "delete_quietly",
]

TEMP_MARKER = ".tmp-"


@dataclass(frozen=True)
class ResolvedLocation:
    """A directory on a pyarrow filesystem.

    Attributes:
        fs: the filesystem.
        path: the directory's path *inside* ``fs`` (no scheme).
        uri: the user-facing location (absolute path for local plain paths, the URI as
            given, without a trailing slash, otherwise).
    """

    fs: pafs.FileSystem
    path: str
    uri: str

    @property
    def is_local(self) -> bool:
        """True when the filesystem is the local one (memory-mapping is possible)."""
        return isinstance(self.fs, pafs.LocalFileSystem)


def absolute(location: str) -> str:
    """A local path made absolute against this process's cwd (``~`` expanded); a URI
    (``s3://...``, ``file://...``) unchanged. Drivers pass locations to workers, which
    run in another cwd, in this form."""
    return location if "://" in location else os.path.abspath(os.path.expanduser(location))


def resolve(uri: str | os.PathLike, filesystem: pafs.FileSystem | None = None) -> ResolvedLocation:
    """Resolve a plain path or a URI into (filesystem, path).

    Args:
        uri: a local path (relative paths are made absolute), a ``file://`` URI, or any
            URI ``pyarrow.fs.FileSystem.from_uri`` understands (``s3://bucket/prefix``).
        filesystem: use this filesystem instead of inferring one; ``uri`` is then the
            path inside it.
    """
    if isinstance(uri, os.PathLike):
        uri = os.fspath(uri)
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"store location must be a non-empty path or URI, got {uri!r}")
    if filesystem is not None:
        path = uri.rstrip("/") or "/"
        if isinstance(filesystem, pafs.LocalFileSystem):
            path = os.path.abspath(os.path.expanduser(path))
        return ResolvedLocation(filesystem, path, path)
    if "://" not in uri:
        path = absolute(uri)
        return ResolvedLocation(pafs.LocalFileSystem(), path, path)
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError with terse text
        raise ValueError(f"cannot open filesystem for store URI {uri!r}: {exc}") from exc
    path = path.rstrip("/") or "/"
    return ResolvedLocation(fs, path, uri.rstrip("/"))


def join(*parts: str) -> str:
    """Join path components with '/' (pyarrow filesystems use POSIX-style paths)."""
    return posixpath.join(*parts)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    """True if ``path`` exists (file or directory) on ``fs``."""
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(fs: pafs.FileSystem, directory: str) -> list[pafs.FileInfo]:
    """Regular files directly inside ``directory`` (empty list if it does not exist)."""
    selector = pafs.FileSelector(directory, allow_not_found=True, recursive=False)
    return [info for info in fs.get_file_info(selector) if info.type == pafs.FileType.File]


def temp_name(final_path: str) -> str:
    """A unique temporary path in the same folder as ``final_path``.

    The name starts with '.' and contains ``.tmp-`` so readers that match final names
    exactly never pick it up.
    """
    head, tail = posixpath.split(final_path)
    return posixpath.join(head, f".{tail}{TEMP_MARKER}{uuid.uuid4().hex}")


def move_into_place(fs: pafs.FileSystem, tmp_path: str, final_path: str, overwrite: bool) -> bool:
    """Move a completely written ``tmp_path`` to ``final_path``.

    On a local filesystem this is a rename (atomic). With ``overwrite=False`` it is a
    hard link + unlink, which fails instead of replacing an existing file, so two
    concurrent writers can never clobber each other. On object stores the move is a
    server-side copy; the final object appears only once complete, and the existence
    check before it is best effort.

    Returns:
        True if the file was moved into place, False if ``final_path`` already existed
        and ``overwrite`` is False (the temp file is then left for the caller).
    """
    if isinstance(fs, pafs.LocalFileSystem):
        if overwrite:
            os.replace(tmp_path, final_path)
            return True
        try:
            os.link(tmp_path, final_path)
        except FileExistsError:
            return False
        except OSError:
            # Filesystem without hard links: fall back to check-then-rename.
            if os.path.exists(final_path):
                return False
            os.replace(tmp_path, final_path)
            return True
        os.unlink(tmp_path)
        return True
    if not overwrite and exists(fs, final_path):
        return False
    fs.move(tmp_path, final_path)
    return True


def delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    """Delete a file, ignoring errors (used to clean up temp files)."""
    try:
        fs.delete_file(path)
    except Exception:  # noqa: BLE001 - best-effort cleanup
        logger.debug("could not delete temporary file %s", path, exc_info=True)


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes, overwrite: bool = True) -> bool:
    """Write ``data`` to ``path`` via a temporary name in the same folder, then move.

    Returns:
        True if written; False if ``overwrite`` is False and ``path`` already existed.
    """
    tmp = temp_name(path)
    try:
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        moved = move_into_place(fs, tmp, path, overwrite=overwrite)
    except BaseException:
        delete_quietly(fs, tmp)
        raise
    if not moved:
        delete_quietly(fs, tmp)
    return moved
