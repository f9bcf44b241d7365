"""Filesystem helpers for the candidate store: URI resolution and atomic writes.

Everything goes through :mod:`pyarrow.fs`, so a store (and a run folder) may live on a
local disk (plain path or ``file://`` URI) or on any filesystem pyarrow can open from a
URI (``s3://bucket/prefix``, ``gs://...``, ``hdfs://...``). A URI may carry the
filesystem's options as a query (``s3://bucket/run?endpoint_override=host:9000&scheme=http``):
:func:`join` keeps the query at the end, so every location under it opens the same way.

Two levels: ``(fs, path)`` helpers (``exists``, ``write_bytes_atomic``, ...) for code that
holds a resolved filesystem, and location helpers (``read_file``, ``write_file``,
``files_in``, ...) that take a plain path, a ``Path`` or a URI.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs

logger = logging.getLogger(__name__)

__all__ = [
    "ResolvedLocation",
    "Uri",
    "absolute",
    "as_location",
    "is_uri",
    "strip_query",
    "with_suffix",
    "location_of",
    "resolve",
    "join",
    "read_file",
    "write_file",
    "file_exists",
    "files_in",
    "remove_tree",
    "local_folder",
    "exists",
    "list_files",
    "is_object_store",
    "write_bytes_atomic",
    "move_into_place",
    "commit_local",
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


def is_uri(location: str | os.PathLike) -> bool:
    """True for a URI (``s3://...``, ``file://...``), False for a local path."""
    return "://" in os.fspath(location)


def absolute(location: str) -> str:
    """A local path made absolute against this process's cwd (``~`` expanded); a URI
    (``s3://...``, ``file://...``) unchanged. Drivers pass locations to workers, which
    run in another cwd, in this form."""
    return location if is_uri(location) else os.path.abspath(os.path.expanduser(location))


def _split_query(location: str) -> tuple[str, str]:
    """("scheme://path", "?query") of a URI with a query; (location, "") otherwise."""
    if "://" in location and "?" in location:
        head, _, query = location.partition("?")
        return head, "?" + query
    return location, ""


def strip_query(location: str | os.PathLike) -> str:
    """``location`` without a URI's query: what names the file (its suffix, its name)."""
    return _split_query(os.fspath(location))[0]


def with_suffix(location: str | os.PathLike, suffix: str) -> str:
    """``location`` + ``suffix`` (".pt"), before a URI's query."""
    head, query = _split_query(os.fspath(location))
    return head + suffix + query


class Uri(str):
    """A URI that joins like a ``Path``: ``Uri("s3://b/run?region=x") / "plots" / "a.png"``
    is ``"s3://b/run/plots/a.png?region=x"``, so run-folder code writes ``run_dir / name``
    for a local folder (a ``Path``) and a URI alike (:func:`as_location`)."""

    __slots__ = ()

    def __truediv__(self, part: str | os.PathLike) -> "Uri":
        return Uri(join(self, os.fspath(part)))

    @property
    def name(self) -> str:
        """The last path component (as ``Path.name``)."""
        return posixpath.basename(_split_query(self)[0].rstrip("/"))


def as_location(location: str | os.PathLike) -> Path | Uri:
    """A URI as a :class:`Uri`, anything else as a ``Path``: both join with ``/``."""
    if isinstance(location, Uri):
        return location
    return Uri(os.fspath(location)) if is_uri(location) else Path(location)


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


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path components with '/' (pyarrow filesystems use POSIX-style paths); a URI's
    query stays at the end (``join("s3://b/run?scheme=http", "x")`` is ``"s3://b/run/x?scheme=http"``)."""
    head, query = _split_query(os.fspath(base))
    return posixpath.join(head, *parts) + query


def location_of(base: str | os.PathLike, fs_path: str) -> str:
    """The location of ``fs_path`` in the form of ``base`` (a local path, or a URI with its
    scheme and query). ``fs_path`` is a path inside ``base``'s filesystem, at or under
    ``base``, as Ray reports a checkpoint's (``Checkpoint.path`` has no scheme)."""
    base = os.fspath(base)
    if not is_uri(base):
        return fs_path
    relative = posixpath.relpath(fs_path.rstrip("/"), resolve(base).path)
    if relative == ".":
        return base
    if relative == ".." or relative.startswith("../"):
        raise ValueError(f"{fs_path} is not under {base}")
    return join(base, relative)


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

    On a local filesystem :func:`commit_local`: durable (fsynced), and with
    ``overwrite=False`` exclusive, so two concurrent writers can never clobber each other.
    On object stores the move is a server-side copy; the final object appears only once
    complete, and the existence check before it is best effort.

    Returns:
        True if the file was moved into place, False if ``final_path`` already existed
        and ``overwrite`` is False (the temp file is then left for the caller).
    """
    if isinstance(fs, pafs.LocalFileSystem):
        return commit_local(tmp_path, final_path, overwrite)
    if not overwrite and exists(fs, final_path):
        return False
    fs.move(tmp_path, final_path)
    return True


# An fsync error meaning "this filesystem cannot fsync that" (some network and FUSE mounts,
# a folder on some systems), not "the data did not reach the disk": the commit goes on.
_FSYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS})
COMMIT_LOCK_WAIT_S = 10.0  # how long a commit waits for another one's lock on the same name


def commit_local(tmp_path: str | os.PathLike, final_path: str | os.PathLike, overwrite: bool) -> bool:
    """Durably move the completely written local file ``tmp_path`` to ``final_path`` in the
    same folder: the one local commit of the store and the run folder.

    The file is fsynced before it gets its final name and the folder after, so once this
    returns a power loss leaves the whole file under that name, never an empty one. With
    ``overwrite`` a rename (``os.replace``); without, a hard link + unlink, which fails
    instead of replacing an existing file; where hard links are unsupported (SMB, some
    FUSE mounts) a rename under an ``O_EXCL`` lock file beside ``final_path``
    (:func:`_replace_exclusive`). Either way, of two commits to one name exactly one wins.

    Returns:
        True if moved into place; False if ``final_path`` already existed and ``overwrite``
        is False (``tmp_path`` is then left for the caller).
    """
    tmp_path, final_path = os.fspath(tmp_path), os.fspath(final_path)
    _fsync(tmp_path)
    if overwrite:
        os.replace(tmp_path, final_path)
    else:
        try:
            os.link(tmp_path, final_path)
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links
            if not _replace_exclusive(tmp_path, final_path):
                return False
        else:
            os.unlink(tmp_path)
    _fsync(os.path.dirname(final_path) or os.curdir, folder=True)
    return True


def _replace_exclusive(tmp_path: str, final_path: str) -> bool:
    """``os.replace(tmp_path, final_path)`` unless ``final_path`` exists, as one step among
    the commits that use it: the check and the rename happen while holding a lock file
    created with ``O_EXCL`` beside ``final_path`` (a hidden temporary name no reader lists).
    A commit that finds the lock taken waits for the name to appear (False) or the lock to
    go; a lock held longer than ``COMMIT_LOCK_WAIT_S`` (a writer that died mid-commit)
    raises TimeoutError naming it. Returns False when ``final_path`` exists."""
    head, tail = os.path.split(final_path)
    lock = os.path.join(head, f".{tail}{TEMP_MARKER}lock")
    deadline = time.monotonic() + COMMIT_LOCK_WAIT_S
    while True:
        try:
            os.close(os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            break
        except FileExistsError:
            if os.path.lexists(final_path):
                return False
            if time.monotonic() > deadline:
                raise TimeoutError(f"{lock}: another commit to {final_path} has held this lock for over "
                                   f"{COMMIT_LOCK_WAIT_S:g} s; if no writer is running, one died mid-commit: "
                                   "delete the lock") from None
            time.sleep(0.01)
    try:
        if os.path.lexists(final_path):
            return False
        os.replace(tmp_path, final_path)
        return True
    finally:
        os.unlink(lock)


def _fsync(path: str, folder: bool = False) -> None:
    """fsync the local file (its data) or ``folder`` (its entries: a rename or link made in
    it) at ``path``. Skipped where the filesystem cannot (``_FSYNC_UNSUPPORTED``); any
    other error raises."""
    if folder and os.name == "nt":  # Windows opens no folder; NTFS journals renames
        return
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if folder else 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _FSYNC_UNSUPPORTED:
            raise
        logger.debug("%s: fsync unsupported here (%s)", path, exc)
    finally:
        os.close(fd)


def delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    """Delete a file, ignoring errors (used to clean up temp files)."""
    try:
        fs.delete_file(path)
    except Exception:  # noqa: BLE001 - best-effort cleanup
        logger.debug("could not delete temporary file %s", path, exc_info=True)


# Object stores publish an object only when its upload completes (a PutObject, or the
# CompleteMultipartUpload that pyarrow's output stream sends on close): readers see the old
# object or the whole new one, never a part, and a writer that dies before the end leaves
# no object (at most an unfinished multipart upload, which no reader sees). With the whole
# content in memory and written in one call, one upload is therefore atomic; an upload
# whose part fails is not completed (close raises). A temporary key plus a move is no safer
# there and costs more: pyarrow's move on S3 / GCS is a server-side copy of every byte,
# then a delete, and a writer killed in between leaves the temporary key behind. Every
# other filesystem (local, HDFS, fsspec wrappers) shows a file while it is being written,
# so there the data goes to a temporary name that is then renamed.
_OBJECT_STORES = tuple(c for c in (getattr(pafs, "S3FileSystem", None), getattr(pafs, "GcsFileSystem", None))
                       if c is not None)


def is_object_store(fs: pafs.FileSystem) -> bool:
    """True for S3 and GCS: no directories, and an object appears only once fully uploaded."""
    return isinstance(fs, _OBJECT_STORES)


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes, overwrite: bool = True) -> bool:
    """Write ``data`` to ``path`` atomically: readers see the old file or all of ``data``.

    On an object store one upload of the whole object (see ``_OBJECT_STORES``); elsewhere
    a temporary name in the same folder, then a move (``move_into_place``).

    Returns:
        True if written; False if ``overwrite`` is False and ``path`` already existed
        (best effort on an object store: checked just before the upload).
    """
    if is_object_store(fs):
        if not overwrite and exists(fs, path):
            return False
        out = fs.open_output_stream(path)
        out.write(data)
        out.close()  # the upload completes here
        return True
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


# ---------------------------------------------------------------- locations (path, Path or URI)


def read_file(location: str | os.PathLike) -> bytes:
    """The bytes of the file at ``location``; FileNotFoundError when there is none."""
    loc = resolve(location)
    if loc.fs.get_file_info(loc.path).type != pafs.FileType.File:
        raise FileNotFoundError(f"{loc.uri} does not exist")
    with loc.fs.open_input_stream(loc.path) as f:
        return f.read()


def write_file(location: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to ``location`` atomically (``write_bytes_atomic``), replacing any
    earlier file; a local parent folder is made first. Returns the location (absolute
    for a local path)."""
    loc = resolve(location)
    parent = posixpath.dirname(loc.path)
    if parent and not is_object_store(loc.fs):  # an object store has no folders to make
        loc.fs.create_dir(parent, recursive=True)
    write_bytes_atomic(loc.fs, loc.path, data, overwrite=True)
    return loc.uri


def file_exists(location: str | os.PathLike) -> bool:
    """True when ``location`` is a file (not a folder)."""
    loc = resolve(location)
    return loc.fs.get_file_info(loc.path).type == pafs.FileType.File


def files_in(folder: str | os.PathLike) -> list[tuple[str, int]]:
    """(name, size in bytes) of the files directly inside ``folder``, by name; [] when it
    does not exist."""
    loc = resolve(folder)
    return sorted((posixpath.basename(i.path), i.size) for i in list_files(loc.fs, loc.path))


def remove_tree(location: str | os.PathLike) -> bool:
    """Delete the folder ``location`` with everything in it; False when there was none.
    Raises ValueError, deleting nothing, for a folder that must never be deleted
    (``protected_folder``: a filesystem root, a whole bucket, home, the working directory
    or a parent of them)."""
    reason = protected_folder(location)
    if reason is not None:
        raise ValueError(f"{location}: refusing to delete {reason}")
    loc = resolve(location)
    if not exists(loc.fs, loc.path):
        return False
    loc.fs.delete_dir(loc.path)
    return True


@contextmanager
def local_folder(location: str | os.PathLike) -> Iterator[Path]:
    """A fresh, empty local folder standing for the folder ``location`` (its earlier
    contents removed), for libraries that write only to local paths (TensorBoard's
    event files): the folder itself for a local path; for a URI a temporary folder,
    uploaded into ``location`` when the block ends without an error (file by file: a
    reader may see part of the folder while it uploads)."""
    if not is_uri(location):
        path = Path(location)
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="twa-upload-") as tmp:
        yield Path(tmp)
        remove_tree(location)
        loc = resolve(location)
        pafs.copy_files(tmp, loc.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=loc.fs)


# ---------------------------------------------------------------- run-folder safety (issue 23)


def protected_folder(location: str | os.PathLike) -> str | None:
    """Why the folder ``location`` must never be deleted, or None: "the filesystem root",
    "a whole bucket" (an object store's bucket, no prefix), "the home folder" or "a parent
    of the home folder", "the working directory" or "a parent of the working directory"
    (links resolved). Pure apart from reading the working directory and home."""
    loc = resolve(location)
    if not loc.is_local:
        inside = loc.path.strip("/")
        if not inside:
            return "the filesystem root"
        return "a whole bucket" if is_object_store(loc.fs) and "/" not in inside else None
    path = Path(os.path.realpath(loc.path))
    if path == Path(path.anchor):
        return "the filesystem root"
    places = {"the working directory": Path(os.path.realpath(os.getcwd())),
              "the home folder": Path(os.path.realpath(os.path.expanduser("~")))}
    for name, place in places.items():
        if path == place:
            return name
    for name, place in places.items():
        if place.is_relative_to(path):
            return f"a parent of {name}"
    return None


def folder_is_empty(location: str | os.PathLike) -> bool:
    """True when the folder ``location`` holds nothing (no file, no folder) or does not exist."""
    loc = resolve(location)
    if loc.fs.get_file_info(loc.path).type == pafs.FileType.File:
        return False
    selector = pafs.FileSelector(loc.path, allow_not_found=True, recursive=False)
    return not loc.fs.get_file_info(selector)


def remove_file(location: str | os.PathLike) -> bool:
    """Delete the file ``location``; False when there was none. Other errors raise: a
    caller that removes a marker must know it is gone."""
    loc = resolve(location)
    if loc.fs.get_file_info(loc.path).type != pafs.FileType.File:
        return False
    loc.fs.delete_file(loc.path)
    return True
