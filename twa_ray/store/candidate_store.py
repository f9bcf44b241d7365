"""The candidate store: n candidate weight vectors w_1..w_n as Arrow columns.

Layout of a store directory (on any ``pyarrow.fs`` filesystem)::

    store.json                      metadata, written once (temp name + move)
    candidates/cand-000000.arrow    one Arrow IPC file per candidate (one row)
    candidates/cand-000001.arrow
    ...

Each candidate file has one column per trainable parameter tensor, named after the
parameter, of type ``fixed_size_list<float32>[numel]``; the candidate's info dict (epoch,
step, metrics, source, ...) is JSON in the schema metadata (key ``twa_ray.info``).

Throughout, D = sum of numels of all parameters ("flat vector" = the parameters
flattened and concatenated in ``names`` order, shape (D,)); n = number of candidates.
Columns are the shard unit: :meth:`CandidateStore.read` with a subset of columns reads
only those columns' bytes (Arrow column projection, memory-mapped when local). Element
ranges are the FSDP2 shard unit: :meth:`CandidateStore.read_fsdp_shard` reads only a rank's
part of every tensor (:meth:`CandidateStore.read_ranges`: one run of elements per tensor cut
on dim 0, one per outer index of a tensor cut on a dim d > 0; slices of the memory map
locally, ranged reads on S3 and other filesystems).

Writes are atomic: a candidate is written under a temporary name and moved to its final
name when complete, so a reader lists and reads whole candidates only. On a local (or
network) filesystem several writers can also fill one candidate in pieces, each its
FSDP2 part: one :meth:`CandidateStore.begin_candidate`, a
:meth:`CandidateStore.write_rows` per writer, then one :meth:`CandidateStore.commit_candidate`
once every writer is done.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import operator
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from . import fs as _fs
from .candidate_file import (
    check_schema,
    column_values,
    decode_info,
    open_candidate,
    open_source,
    read_schema,
    read_value_ranges,
    write_candidate_file,
    write_value_ranges,
    write_zero_candidate_file,
)
from .rows import fsdp_element_ranges

Ranges = Sequence["tuple[int, int] | Sequence[tuple[int, int]]"]  # per tensor: one range, or several

logger = logging.getLogger(__name__)

__all__ = ["CandidateStore", "CandidateInfo", "STORE_FORMAT", "STORE_FORMAT_VERSION"]

STORE_FORMAT = "twa_ray.candidate_store"
STORE_FORMAT_VERSION = 1
METADATA_FILE = "store.json"
CANDIDATE_DIR = "candidates"
_CANDIDATE_RE = re.compile(r"^cand-(\d+)\.arrow$")
_MAX_NUMEL = 2**31 - 1  # Arrow fixed_size_list size is int32


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


def _dtype_name(dtype: Any) -> str:
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    if isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic)):
        return np.dtype(dtype).name
    if isinstance(dtype, str) and dtype:
        return dtype.removeprefix("torch.")
    raise TypeError(f"dtype must be a torch.dtype or a string, got {dtype!r}")


def _json_dumps(obj: Any, what: str) -> str:
    try:
        return json.dumps(obj, sort_keys=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} must be JSON-serialisable: {exc}") from exc


def _as_runs(runs) -> list[tuple[int, int]]:
    """One tensor's ranges as a list of int pairs: ``(start, end)`` is one range, else a sequence of them."""
    if len(runs) == 2:
        try:
            return [(operator.index(runs[0]), operator.index(runs[1]))]
        except TypeError:  # two ranges
            pass
    return [(operator.index(a), operator.index(b)) for a, b in runs]


class CandidateStore:
    """Candidate weight vectors in Arrow IPC files, one column per parameter tensor.

    Create with :meth:`create` or open with :meth:`open`; do not call the constructor
    directly. Instances are picklable (they hold the pyarrow filesystem and metadata),
    so a store can be handed to Ray workers, each reading only its own columns.

    Attributes:
        bytes_read: payload bytes requested by :meth:`read`, :meth:`read_ranges`, :meth:`read_rows`
            (and the methods built on them) on this instance: selected values x candidates x 4.
            Footer and metadata reads are not counted. Reset it by assigning 0.
        bytes_written: bytes written by :meth:`begin_candidate` (headers and footer) and
            :meth:`write_rows` (values) on this instance. Reset it by assigning 0.
    """

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
    ) -> "CandidateStore":
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
        metadata = cls._build_metadata(names, shapes, dtypes, meta)
        meta_path = _fs.join(loc.path, METADATA_FILE)
        cand_dir = _fs.join(loc.path, CANDIDATE_DIR)

        if _fs.exists(loc.fs, meta_path):
            return cls._open_existing_for_create(loc, metadata, exist_ok)
        if any(_CANDIDATE_RE.match(_basename(i.path)) for i in _fs.list_files(loc.fs, cand_dir)):
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
    def _open_existing_for_create(cls, loc: _fs.ResolvedLocation, metadata: dict, exist_ok: bool) -> "CandidateStore":
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

    @staticmethod
    def _build_metadata(names, shapes, dtypes, meta) -> dict:
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
            if numel > _MAX_NUMEL:
                raise ValueError(f"parameter {n!r}: {numel} elements exceed the Arrow limit of {_MAX_NUMEL} per column")
        if dtypes is None:
            dtypes = ["float32"] * len(names)
        dtypes = [_dtype_name(d) for d in dtypes]
        if len(dtypes) != len(names):
            raise ValueError(f"got {len(names)} names but {len(dtypes)} dtypes")
        meta = dict(meta or {})
        _json_dumps(meta, "meta")
        return {
            "format": STORE_FORMAT,
            "version": STORE_FORMAT_VERSION,
            "names": names,
            "shapes": shapes,
            "dtypes": dtypes,
            "meta": meta,
        }

    @classmethod
    def create_for_model(
        cls,
        uri: str | os.PathLike,
        model: torch.nn.Module,
        meta: Mapping[str, Any] | None = None,
        exist_ok: bool = False,
        *,
        filesystem: pafs.FileSystem | None = None,
    ) -> "CandidateStore":
        """Create a store for ``model``'s trainable parameters (``requires_grad``), in
        ``named_parameters()`` order. Buffers (e.g. BatchNorm statistics) are not stored."""
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return cls.create(uri, [n for n, _ in params], [tuple(p.shape) for _, p in params],
                          [p.dtype for _, p in params], meta=meta, exist_ok=exist_ok, filesystem=filesystem)

    @classmethod
    def open(cls, uri: str | os.PathLike, *, filesystem: pafs.FileSystem | None = None) -> "CandidateStore":
        """Open an existing store.

        Raises:
            FileNotFoundError: there is no ``store.json`` at ``uri`` (names the path).
            ValueError: ``store.json`` is corrupt or of an unknown format (names the file).
        """
        return cls._open_location(_fs.resolve(uri, filesystem))

    @classmethod
    def _open_location(cls, loc: _fs.ResolvedLocation) -> "CandidateStore":
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
        problem = _metadata_problem(metadata)
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

    # ------------------------------------------------------------------ writing
    def append(self, tensors: Sequence[torch.Tensor] | Mapping[str, torch.Tensor], info: Mapping[str, Any] | None = None) -> int:
        """Add one candidate; returns its index (the next free one).

        Args:
            tensors: per parameter a tensor with that parameter's shape, either a list
                in ``names`` order or a dict name -> tensor. Any floating dtype, any
                device; stored as float32.
            info: JSON-serialisable dict stored with the candidate (epoch, step,
                metrics, source, ...).

        Raises:
            ValueError: a parameter is missing, unexpected, has the wrong shape, or holds
                NaN/Inf (the message names the parameter).
            TypeError: a tensor is not floating point, or ``info`` is not JSON-serialisable.
        """
        arrays = self._to_arrays(tensors)
        info_json = self._info_json(info)
        tmp = self._temp_path()
        try:
            write_candidate_file(self._loc.fs, tmp, self._names, arrays, info_json)
        except BaseException:
            _fs.delete_quietly(self._loc.fs, tmp)
            raise
        return self._commit(tmp)

    def _temp_path(self) -> str:
        """A new temporary name in the candidate folder: no reader lists it."""
        return _fs.temp_name(_fs.join(self._candidate_dir(), "cand.arrow"))

    def _commit(self, tmp: str) -> int:
        """Move the complete candidate file ``tmp`` to the next free index; returns the index.
        ``tmp`` is deleted when that fails."""
        fs = self._loc.fs
        try:
            for _ in range(10_000):
                index = self._next_free_index()
                if _fs.move_into_place(fs, tmp, self._candidate_path(index), overwrite=False):
                    break
            else:  # pragma: no cover - would need 10k concurrent writers
                raise RuntimeError(f"could not find a free candidate index in {self.uri}")
        except BaseException:
            _fs.delete_quietly(fs, tmp)
            raise
        logger.debug("stored candidate %d in %s", index, self.uri)
        return index

    # ------------------------------------------------------------------ writing in row pieces
    def begin_candidate(self, info: Mapping[str, Any] | None = None) -> str:
        """Start a candidate that several writers fill in pieces (e.g. FSDP2 ranks, each its rows).

        Writes the candidate's file, all values zero and not yet written (holes: only the
        headers and footer take bytes), under a temporary name that no reader lists.
        Every writer then calls :meth:`write_rows` with the returned path (from its own
        instance of the store), and one of them :meth:`commit_candidate` once all are done;
        or :meth:`discard_candidate`.

        Only on a local filesystem (shared by the writers: one node, or a network
        filesystem): object stores cannot write into a file. Raises ValueError elsewhere,
        and TypeError when ``info`` is not JSON-serialisable.
        """
        if not self.is_local:
            raise ValueError(f"candidate store {self.uri}: writing a candidate in pieces needs a local or network "
                             "filesystem (an object store cannot write into a file); use append()")
        info_json = self._info_json(info)
        pending = self._temp_path()
        try:
            self.bytes_written += write_zero_candidate_file(pending, self._names, self._numels, info_json)
        except BaseException:
            _fs.delete_quietly(self._loc.fs, pending)
            raise
        return pending

    def write_rows(self, pending: str, ranges: Ranges, values: torch.Tensor) -> int:
        """Write one piece of the candidate :meth:`begin_candidate` started at ``pending``.

        Args:
            ranges: per tensor (store order, length P) a flat element range ``[start, end)``,
                or a list of increasing, non-overlapping ones (e.g. :meth:`fsdp_ranges`); pieces
                of different writers must not overlap.
            values: shape (sum of (end - start),), any floating dtype and device: the ranges'
                values concatenated in store order (e.g. the local FSDP2 shards, flattened).
        Returns:
            The bytes written (4 per value).
        Raises:
            ValueError: ``ranges`` do not fit the tensors, ``values`` has the wrong size,
                or holds NaN/Inf (the message names the parameter).
        """
        self._check_pending(pending)
        ranges, width = self._checked_ranges(ranges)
        values = torch.as_tensor(values).detach().to(device="cpu", dtype=torch.float32).reshape(-1)
        if values.numel() != width:
            raise ValueError(f"{values.numel()} values for ranges of {width} elements")
        at = 0
        for name, runs in zip(self._names, ranges):
            count = sum(b - a for a, b in runs)
            if not bool(torch.isfinite(values[at:at + count]).all()):
                where = ", ".join(f"[{a}, {b})" for a, b in runs[:3]) + (", ..." if len(runs) > 3 else "")
                raise ValueError(f"parameter {name!r}: elements {where} hold NaN or Inf values")
            at += count
        nbytes = write_value_ranges(pending, self._numels, ranges, values.numpy())
        self.bytes_written += nbytes
        return nbytes

    def read_rows(self, pending: str, ranges: Ranges) -> torch.Tensor:
        """The values at ``ranges`` of the candidate begun at ``pending`` (not yet committed), as
        the filesystem holds them now: what :meth:`write_rows` wrote there, or zeros where a
        write did not arrive (a filesystem that keeps one writer's copy of a file, such as a
        FUSE mount of an object store, loses the others').

        Args:
            ranges: as for :meth:`write_rows`.
        Returns:
            float32, shape (sum of (end - start),): the ranges' values in store order.
        Raises:
            ValueError: ``ranges`` do not fit the tensors, or ``pending`` is not a candidate
                begun in this store or is not a whole candidate file.
        """
        self._check_pending(pending)
        ranges, width = self._checked_ranges(ranges)
        out = np.empty(width, dtype=np.float32)
        with open_source(self._loc.fs, pending, self._loc.is_local) as source:
            read_value_ranges(source, pending, self._numels, ranges, out)
        self.bytes_read += 4 * width
        return torch.from_numpy(out)

    def mount(self) -> str:
        """The store's folder, and on Linux the mount that holds it and its type, for messages
        (e.g. ``/mnt/gcs/store (mount /mnt/gcs, type fuse.gcsfuse)``)."""
        if not self.is_local:
            return f"{self.uri} ({self._loc.fs.type_name})"
        path = os.path.realpath(self._loc.path)
        try:
            with open("/proc/self/mounts") as f:
                mounts = [line.split()[1:3] for line in f if len(line.split()) > 2]
        except OSError:
            return path
        # octal escapes (a space is \040) in mount points
        mounts = [(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), point), kind) for point, kind in mounts]
        inside = [(point, kind) for point, kind in mounts
                  if path == point or path.startswith(point.rstrip("/") + "/")]
        if not inside:
            return path
        point, kind = max(inside, key=lambda m: len(m[0]))
        return f"{path} (mount {point}, type {kind})"

    def commit_candidate(self, pending: str) -> int:
        """Publish the candidate at ``pending`` once every writer's :meth:`write_rows` has
        returned: it moves to the next free index atomically. Returns that index."""
        self._check_pending(pending)
        return self._commit(pending)

    def discard_candidate(self, pending: str) -> None:
        """Delete a candidate started with :meth:`begin_candidate` and not committed."""
        self._check_pending(pending)
        _fs.delete_quietly(self._loc.fs, pending)

    def _check_pending(self, pending: str) -> None:
        head, tail = pending.rsplit("/", 1) if "/" in pending else ("", pending)
        if head != self._candidate_dir() or _fs.TEMP_MARKER not in tail:
            raise ValueError(f"{pending!r} is not a candidate begun in store {self.uri}")

    def append_flat(self, vector: torch.Tensor, info: Mapping[str, Any] | None = None) -> int:
        """Add one candidate given as a flat vector of shape (D,) in ``names`` order.

        Returns the new candidate's index. Errors name the offending parameter.
        """
        vector = torch.as_tensor(vector)
        if vector.dim() != 1 or vector.numel() != self.num_params:
            raise ValueError(f"flat vector has shape {tuple(vector.shape)}, expected ({self.num_params},)")
        parts = [vector[a:b].view(shape) for a, b, shape in zip(self._offsets[:-1], self._offsets[1:], self._shapes)]
        return self.append(parts, info)

    def append_model(self, model: torch.nn.Module, info: Mapping[str, Any] | None = None) -> int:
        """Add ``model``'s trainable parameters (``requires_grad``) as one candidate."""
        return self.append({n: p for n, p in model.named_parameters() if p.requires_grad}, info)

    def _info_json(self, info: Mapping[str, Any] | None) -> str:
        if info is None:
            info = {}
        if not isinstance(info, Mapping):
            raise TypeError(f"candidate info must be a dict, got {type(info).__name__}")
        return _json_dumps(dict(info), "candidate info")

    def _to_arrays(self, tensors) -> list[np.ndarray]:
        """Validate and convert to per-parameter contiguous float32 numpy arrays (numel_i,)."""
        if isinstance(tensors, Mapping):
            missing = [n for n in self._names if n not in tensors]
            extra = [str(n) for n in tensors if n not in self._name_to_index]
            if missing or extra:
                parts = []
                if missing:
                    parts.append(f"missing parameter(s) {missing}")
                if extra:
                    parts.append(f"unexpected parameter(s) {extra}")
                raise ValueError(f"candidate does not match store {self.uri}: " + "; ".join(parts))
            items = [(n, tensors[n]) for n in self._names]
        else:
            if isinstance(tensors, torch.Tensor):
                raise TypeError("append() takes a list or dict of tensors; use append_flat() for a flat vector")
            tensors = list(tensors)
            if len(tensors) != len(self._names):
                raise ValueError(
                    f"candidate has {len(tensors)} tensors, store {self.uri} expects {len(self._names)} "
                    f"(parameters {self._names})"
                )
            items = list(zip(self._names, tensors))
        arrays = []
        for (name, t), shape in zip(items, self._shapes):
            t = torch.as_tensor(t)
            if not (t.is_floating_point()):
                raise TypeError(f"parameter {name!r}: dtype {t.dtype} is not floating point")
            if tuple(t.shape) != shape:
                raise ValueError(f"parameter {name!r}: shape {tuple(t.shape)} does not match the store's {shape}")
            t = t.detach().to(device="cpu", dtype=torch.float32)
            finite = torch.isfinite(t)
            if not bool(finite.all()):
                n_nan = int(torch.isnan(t).sum())
                n_inf = int((~finite).sum()) - n_nan
                raise ValueError(
                    f"parameter {name!r}: {n_nan} NaN and {n_inf} Inf values (after conversion to float32)"
                )
            arrays.append(t.contiguous().view(-1).numpy())
        return arrays

    # ------------------------------------------------------------------ listing
    def _candidate_dir(self) -> str:
        return _fs.join(self._loc.path, CANDIDATE_DIR)

    def _candidate_path(self, index: int) -> str:
        return _fs.join(self._candidate_dir(), candidate_file_name(index))

    def _listed_files(self) -> list[tuple[int, pafs.FileInfo]]:
        """Final-named candidate files (complete or not), sorted by index."""
        out = []
        for info in _fs.list_files(self._loc.fs, self._candidate_dir()):
            m = _CANDIDATE_RE.match(_basename(info.path))
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

    # ------------------------------------------------------------------ reading
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

    def read(
        self,
        columns: Iterable[str | int] | None = None,
        candidates: Iterable[int] | None = None,
    ) -> torch.Tensor:
        """Read selected columns of selected candidates into one float32 tensor.

        Args:
            columns: parameter names or integer indices into ``names``; the output
                concatenates them in the order given. Default: all, in store order
                (rows are then the flat vectors).
            candidates: candidate indices; rows come in the order given. Default: all
                complete candidates, sorted by index.

        Returns:
            A writable float32 CPU tensor of shape (n_selected, sum of the selected
            columns' numels). Only the selected columns are read from storage (column
            projection; memory-mapped when local), each copied once into its slice.

        Raises:
            IndexError: a requested candidate does not exist.
            ValueError: a candidate file is incomplete or does not match the store.
        """
        col_idx = self.resolve_columns(columns)
        targets = self._targets(candidates)
        sizes = [self._numels[j] for j in col_idx]
        starts = np.cumsum([0] + sizes).tolist()
        out = torch.empty((len(targets), starts[-1]), dtype=torch.float32)
        if not targets or not col_idx:
            return out
        out_np = out.numpy()
        fields = sorted(set(col_idx))
        row_bytes = 4 * sum(self._numels[j] for j in fields)
        for row, (index, path) in enumerate(targets):
            self._read_row(index, path, fields, col_idx, starts, out_np[row])
            self.bytes_read += row_bytes
        return out

    def _targets(self, candidates: Iterable[int] | None) -> list[tuple[int, str]]:
        """(index, path) of the selected candidates; all complete ones, sorted, for None."""
        if candidates is None:
            return [(c.index, c.path) for c in self.list_candidates()]
        if isinstance(candidates, int):
            raise TypeError("candidates must be a list of indices, not a single index")
        return [(i, self._candidate_path(i)) for i in (operator.index(c) for c in candidates)]

    @contextmanager
    def _reading(self, index: int, path: str) -> Iterator[None]:
        """Turn a missing file into IndexError and an unreadable one into ValueError."""
        try:
            yield
        except FileNotFoundError:
            raise IndexError(f"no candidate {index} in store {self.uri} ({path} does not exist)") from None
        except (pa.ArrowInvalid, pa.ArrowIOError) as exc:
            raise ValueError(f"candidate {index} in store {self.uri} is unreadable ({path}): {exc}") from exc

    def _read_row(self, index: int, path: str, fields: list[int], col_idx: list[int],
                  starts: list[int], dest: np.ndarray) -> None:
        with self._reading(index, path):
            with open_candidate(self._loc.fs, path, self._loc.is_local, included_fields=fields) as reader:
                if reader.num_record_batches != 1:
                    raise ValueError(f"candidate file {path}: expected 1 record batch, found {reader.num_record_batches}")
                batch = reader.get_batch(0)
                for k, j in enumerate(col_idx):
                    dest[starts[k]:starts[k + 1]] = column_values(batch, self._names[j], self._numels[j], path)

    def fsdp_ranges(self, rank: int, world: int) -> list[list[tuple[int, int]]]:
        """Per tensor (store order), the flat element ranges ``[start, end)`` of the part
        ``parallel.sharding.fsdp_tensors.fsdp_wrap`` gives ``rank`` of ``world`` ranks
        (:func:`twa_ray.store.rows.fsdp_element_ranges`): one range for a tensor cut on dim 0,
        one per outer index for one cut on a dim d > 0, none where the rank holds nothing."""
        return fsdp_element_ranges(self._shapes, rank, world)

    def read_ranges(
        self,
        ranges: Ranges,
        candidates: Iterable[int] | None = None,
    ) -> torch.Tensor:
        """Read element ranges of every tensor of selected candidates, and nothing else.

        Args:
            ranges: per tensor (store order, length P) a flat element range ``[start, end)``
                within that tensor, ``0 <= start <= end <= numel``, or a list of increasing,
                non-overlapping ones; empty ranges read nothing, adjacent ones are merged.
            candidates: candidate indices; rows come in the order given. Default: all
                complete candidates, sorted by index.

        Returns:
            A writable float32 CPU tensor of shape (n_selected, sum of (end - start)): per
            candidate the ranges' values concatenated in store order. From each file only
            its message headers (about 80 bytes per tensor) and these ranges are read:
            slices of the memory map when local, one ranged read per (merged) range otherwise.

        Raises:
            IndexError: a requested candidate does not exist.
            ValueError: ``ranges`` do not fit the tensors, or a candidate file is
                incomplete or does not match the store.
        """
        ranges, width = self._checked_ranges(ranges)
        targets = self._targets(candidates)
        out = torch.empty((len(targets), width), dtype=torch.float32)
        out_np = out.numpy()
        for row, (index, path) in enumerate(targets):
            with self._reading(index, path):
                with open_source(self._loc.fs, path, self._loc.is_local) as source:
                    read_value_ranges(source, path, self._numels, ranges, out_np[row])
            self.bytes_read += 4 * width
        return out

    def _checked_ranges(self, ranges: Ranges) -> tuple[list[list[tuple[int, int]]], int]:
        """(per tensor its non-empty ranges as ints, adjacent ones merged; their total length).
        ValueError when they do not fit the tensors or overlap."""
        if len(ranges) != len(self._names):
            raise ValueError(f"got {len(ranges)} ranges for the {len(self._names)} tensors of store {self.uri}")
        out = []
        for name, runs, numel in zip(self._names, ranges, self._numels):
            merged: list[tuple[int, int]] = []
            for a, b in _as_runs(runs):
                if not 0 <= a <= b <= numel:
                    raise ValueError(f"range [{a}, {b}) does not fit parameter {name!r} of {numel} elements")
                if a == b:
                    continue
                if merged and a < merged[-1][1]:
                    raise ValueError(f"parameter {name!r}: range [{a}, {b}) overlaps or precedes "
                                     f"[{merged[-1][0]}, {merged[-1][1]}); give increasing, disjoint ranges")
                if merged and a == merged[-1][1]:
                    merged[-1] = (merged[-1][0], b)
                else:
                    merged.append((a, b))
            out.append(merged)
        return out, sum(b - a for runs in out for a, b in runs)

    def read_fsdp_shard(self, rank: int, world: int, candidates: Iterable[int] | None = None) -> torch.Tensor:
        """``rank``'s FSDP2 shard of selected candidates: ``read_ranges(fsdp_ranges(rank, world), candidates)``.

        Returns:
            float32, shape (n_selected, sum of the rank's element counts): per candidate the
            concatenation, in store order, of ``p.to_local().reshape(-1)`` for every parameter
            ``p`` of a model whose parameters FSDP2 sharded over ``world`` ranks.
        """
        return self.read_ranges(self.fsdp_ranges(rank, world), candidates)

    def read_flat(self, index: int) -> torch.Tensor:
        """Candidate ``index`` as a flat float32 vector of shape (D,), in ``names`` order."""
        return self.read(candidates=[index])[0]

    def read_candidate(self, index: int) -> dict[str, torch.Tensor]:
        """Candidate ``index`` as a dict name -> float32 tensor with the original shape.

        The tensors are views into one (D,) buffer (no extra copy).
        """
        flat = self.read_flat(index)
        return {
            n: flat[a:b].view(shape)
            for n, a, b, shape in zip(self._names, self._offsets[:-1], self._offsets[1:], self._shapes)
        }


def _copy_info(cand: CandidateInfo) -> CandidateInfo:
    return CandidateInfo(cand.index, cand.path, copy.deepcopy(cand.info))


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _metadata_problem(md: Any) -> str | None:
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
