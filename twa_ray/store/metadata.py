"""The store's metadata side: create and open a store, its parameters (names, shapes,
dtypes, offsets of the flat vector), its free meta, and the list of its complete candidates.

:class:`StoreMetadata` is the base of ``CandidateStore`` (:mod:`.candidate_store`); the
reading and writing methods come from :mod:`.read` and :mod:`.write`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import operator
import os
from typing import Any, Iterable, Mapping, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import torch

from . import fs as _fs
from .candidate_file import check_schema, decode_info, read_schema
from .ranges import Ranges, checked_ranges
from .schema import (
    CANDIDATE_DIR,
    CANDIDATE_RE,
    METADATA_FILE,
    CandidateInfo,
    build_metadata,
    candidate_file_name,
    metadata_problem,
    parameter_mismatch,
)

logger = logging.getLogger(__name__)

__all__ = ["StoreMetadata"]


class StoreMetadata:
    """Create / open a store, its parameters and meta, its list of candidates (the base of
    ``CandidateStore``; create with :meth:`create` or open with :meth:`open`, not the constructor)."""

    def __init__(self, location: _fs.ResolvedLocation, metadata: dict):
        self._loc = location
        self._names: list[str] = list(metadata["names"])
        self._shapes: list[tuple[int, ...]] = [tuple(int(d) for d in s) for s in metadata["shapes"]]
        self._dtypes: list[str] = list(metadata["dtypes"])
        self._meta: dict = dict(metadata.get("meta") or {})
        self._numels: list[int] = [math.prod(s) for s in self._shapes]
        self._offsets: list[int] = [0]
        for numel in self._numels:
            self._offsets.append(self._offsets[-1] + numel)
        self._name_to_index = {n: i for i, n in enumerate(self._names)}
        # file name -> (size, CandidateInfo); files are immutable once in place
        self._footer_cache: dict[str, tuple[int, CandidateInfo]] = {}
        self._warned_bad: set[tuple[str, int]] = set()
        self.bytes_read: int = 0
        self.bytes_written: int = 0

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(
        cls,
        uri: str | os.PathLike,
        names: Sequence[str],
        shapes: Sequence[Sequence[int]],
        dtypes: Sequence[Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        exist_ok: bool = False,
        *,
        filesystem: pafs.FileSystem | None = None,
    ) -> "StoreMetadata":
        """Create a new, empty store at ``uri`` (a local path or a URI like ``s3://b/p``).

        Args:
            names: the model's trainable parameter names, in the fixed order that
                defines the flat vector.
            shapes: per parameter its shape (``torch.Size``, tuple or list).
            dtypes: per parameter its original dtype (``torch.dtype`` or string);
                default all ``float32``. Values are always stored as float32.
            meta: free JSON-serialisable metadata (model and data config, ...).
            exist_ok: if a store already exists at ``uri`` with the same names and
                shapes, open it instead of failing (its stored ``meta`` is kept).
            filesystem: an explicit pyarrow filesystem; ``uri`` is then a path in it.

        Raises:
            FileExistsError: a store exists and ``exist_ok`` is False, or the folder
                holds candidate files without a ``store.json``.
            ValueError: a store exists with different names/shapes (message names the
                uri), or the arguments are inconsistent.
        """
        loc = _fs.resolve(uri, filesystem)
        metadata = build_metadata(names, shapes, dtypes, meta)
        meta_path = _fs.join(loc.path, METADATA_FILE)
        cand_dir = _fs.join(loc.path, CANDIDATE_DIR)

        if _fs.exists(loc.fs, meta_path):
            return cls._open_existing_for_create(loc, metadata, exist_ok)
        if any(CANDIDATE_RE.match(_basename(i.path)) for i in _fs.list_files(loc.fs, cand_dir)):
            raise FileExistsError(
                f"{loc.uri} holds candidate files but no {METADATA_FILE}; refusing to create a store over them"
            )
        loc.fs.create_dir(loc.path, recursive=True)
        loc.fs.create_dir(cand_dir, recursive=True)
        data = json.dumps(metadata, indent=1).encode("utf-8")
        if not _fs.write_bytes_atomic(loc.fs, meta_path, data, overwrite=False):
            # another process created it concurrently
            return cls._open_existing_for_create(loc, metadata, exist_ok)
        logger.info("created candidate store at %s (%d tensors, D=%d)", loc.uri, len(metadata["names"]),
                    sum(math.prod(s) for s in metadata["shapes"]))
        return cls(loc, metadata)

    @classmethod
    def _open_existing_for_create(cls, loc: _fs.ResolvedLocation, metadata: dict, exist_ok: bool) -> "StoreMetadata":
        if not exist_ok:
            raise FileExistsError(f"a candidate store already exists at {loc.uri} (pass exist_ok=True to reuse it)")
        store = cls._open_location(loc)
        problem = parameter_mismatch(store.names, store.shapes, metadata["names"], metadata["shapes"],
                                     "stored", "requested")
        if problem:
            raise ValueError(f"the candidate store at {store.uri} has different parameters: {problem}")
        if store.dtypes != metadata["dtypes"]:
            logger.warning("candidate store at %s was created with dtypes %s, now given %s; keeping the stored ones",
                           store.uri, store.dtypes, metadata["dtypes"])
        return store


    @classmethod
    def create_for_model(
        cls,
        uri: str | os.PathLike,
        model: torch.nn.Module,
        meta: Mapping[str, Any] | None = None,
        exist_ok: bool = False,
        *,
        filesystem: pafs.FileSystem | None = None,
    ) -> "StoreMetadata":
        """Create a store for ``model``'s trainable parameters (``requires_grad``), in
        ``named_parameters()`` order. Buffers (e.g. BatchNorm statistics) are not stored."""
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return cls.create(uri, [n for n, _ in params], [tuple(p.shape) for _, p in params],
                          [p.dtype for _, p in params], meta=meta, exist_ok=exist_ok, filesystem=filesystem)

    @classmethod
    def open(cls, uri: str | os.PathLike, *, filesystem: pafs.FileSystem | None = None) -> "StoreMetadata":
        """Open an existing store.

        Raises:
            FileNotFoundError: there is no ``store.json`` at ``uri`` (names the path).
            ValueError: ``store.json`` is corrupt or of an unknown format (names the file).
        """
        return cls._open_location(_fs.resolve(uri, filesystem))

    @classmethod
    def _open_location(cls, loc: _fs.ResolvedLocation) -> "StoreMetadata":
        meta_path = _fs.join(loc.path, METADATA_FILE)
        meta_display = _fs.join(loc.uri, METADATA_FILE)
        try:
            with loc.fs.open_input_stream(meta_path) as f:
                raw = f.read()
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"no candidate store at {loc.uri}: {meta_display} does not exist") from exc
        except OSError as exc:
            if not _fs.exists(loc.fs, meta_path):
                raise FileNotFoundError(f"no candidate store at {loc.uri}: {meta_display} does not exist") from exc
            raise
        try:
            metadata = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"corrupt candidate store metadata {meta_display}: {exc}") from exc
        problem = metadata_problem(metadata)
        if problem:
            raise ValueError(f"corrupt candidate store metadata {meta_display}: {problem}")
        return cls(loc, metadata)

    # ------------------------------------------------------------------ properties
    @property
    def uri(self) -> str:
        """The store's location (absolute path for local plain paths, else the URI)."""
        return self._loc.uri

    @property
    def path(self) -> str:
        """The store directory's path inside :attr:`filesystem`."""
        return self._loc.path

    @property
    def filesystem(self) -> pafs.FileSystem:
        """The pyarrow filesystem the store lives on."""
        return self._loc.fs

    @property
    def is_local(self) -> bool:
        """True when the store is on the local filesystem (reads are memory-mapped)."""
        return self._loc.is_local

    @property
    def names(self) -> list[str]:
        """Parameter names, in flat-vector order (length P)."""
        return list(self._names)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """Per parameter its shape, as a tuple (length P)."""
        return list(self._shapes)

    @property
    def numels(self) -> list[int]:
        """Per parameter its number of elements (length P)."""
        return list(self._numels)

    @property
    def offsets(self) -> list[int]:
        """Cumulative offsets, length P+1: parameter i is ``flat[offsets[i]:offsets[i+1]]``."""
        return list(self._offsets)

    @property
    def dtypes(self) -> list[str]:
        """Per parameter its original dtype name (e.g. ``'float32'``, ``'bfloat16'``)."""
        return list(self._dtypes)

    @property
    def meta(self) -> dict:
        """The free metadata dict given at creation (a deep copy)."""
        return copy.deepcopy(self._meta)

    @property
    def num_params(self) -> int:
        """D, the total number of stored values per candidate (sum of numels)."""
        return self._offsets[-1]

    def __len__(self) -> int:
        """Number of complete candidates."""
        return len(self.list_candidates())

    def __repr__(self) -> str:
        return f"CandidateStore({self.uri!r}, tensors={len(self._names)}, D={self.num_params})"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_warned_bad"] = set()
        return state

    # ------------------------------------------------------------------ listing
    def _candidate_dir(self) -> str:
        return _fs.join(self._loc.path, CANDIDATE_DIR)

    def _candidate_path(self, index: int) -> str:
        return _fs.join(self._candidate_dir(), candidate_file_name(index))

    def _listed_files(self) -> list[tuple[int, pafs.FileInfo]]:
        """Final-named candidate files (complete or not), sorted by index."""
        out = []
        for info in _fs.list_files(self._loc.fs, self._candidate_dir()):
            m = CANDIDATE_RE.match(_basename(info.path))
            if m:
                out.append((int(m.group(1)), info))
        out.sort(key=lambda x: x[0])
        return out

    def _next_free_index(self) -> int:
        files = self._listed_files()
        return files[-1][0] + 1 if files else 0

    def list_candidates(self) -> list[CandidateInfo]:
        """The complete candidates, sorted by index, from their file footers only.

        No weights are read (``bytes_read`` is unchanged). A final-named file that is
        not a complete Arrow file (e.g. truncated by a crash) is skipped with a logged
        warning; leftover temporary files are ignored.

        Raises:
            ValueError: a complete candidate file's columns do not match the store.
        """
        result = []
        seen = set()
        for index, finfo in self._listed_files():
            name = _basename(finfo.path)
            seen.add(name)
            size = finfo.size
            cached = self._footer_cache.get(name)
            if cached is not None and cached[0] == size:
                result.append(_copy_info(cached[1]))
                continue
            try:
                schema = read_schema(self._loc.fs, finfo.path, self._loc.is_local)
            except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as exc:
                if isinstance(exc, FileNotFoundError):  # removed since listing
                    continue
                if (name, size) not in self._warned_bad:
                    self._warned_bad.add((name, size))
                    logger.warning("skipping incomplete candidate file %s (%d bytes) in %s: %s",
                                   name, size or 0, self.uri, exc)
                continue
            check_schema(schema, self._names, self._numels, finfo.path)
            cand = CandidateInfo(index=index, path=finfo.path, info=decode_info(schema, finfo.path))
            self._footer_cache[name] = (size, cand)
            result.append(_copy_info(cand))
        for stale in set(self._footer_cache) - seen:
            del self._footer_cache[stale]
        return result

    def candidate_indices(self) -> list[int]:
        """Indices of the complete candidates, sorted."""
        return [c.index for c in self.list_candidates()]

    # ------------------------------------------------------------------ columns
    def resolve_columns(self, columns: Iterable[str | int] | None = None) -> list[int]:
        """Map column specs (names, or integer indices into ``names``) to indices.

        ``None`` means all columns in store order. Raises KeyError/IndexError naming the
        unknown column.
        """
        if columns is None:
            return list(range(len(self._names)))
        if isinstance(columns, (str, int)):
            raise TypeError("columns must be a list of names or indices, not a single value")
        out = []
        for c in columns:
            if isinstance(c, str):
                if c not in self._name_to_index:
                    raise KeyError(f"unknown column {c!r} in candidate store {self.uri}")
                out.append(self._name_to_index[c])
            else:
                try:
                    i = operator.index(c)
                except TypeError:
                    raise TypeError(f"column must be a name or an integer index, got {c!r}") from None
                if not 0 <= i < len(self._names):
                    raise IndexError(f"column index {i} out of range for {len(self._names)} parameters")
                out.append(i)
        return out


    def _checked_ranges(self, ranges: Ranges) -> tuple[list[list[tuple[int, int]]], int]:
        """(per tensor its non-empty ranges as ints, adjacent ones merged; their total length).
        ValueError when they do not fit the tensors or overlap (:func:`.ranges.checked_ranges`)."""
        return checked_ranges(ranges, self._names, self._numels, self.uri)


def _copy_info(cand: CandidateInfo) -> CandidateInfo:
    return CandidateInfo(cand.index, cand.path, copy.deepcopy(cand.info))


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]
