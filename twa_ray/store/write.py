"""Writing candidates: :meth:`StoreWrites.append` (a whole candidate in one go), and the
pending protocol for several writers filling one candidate in pieces, each its element ranges
(``begin_candidate``, a ``write_rows`` per writer, ``read_rows`` to check what arrived, with
:func:`rows_checksum`, then ``commit_candidate`` or ``discard_candidate``).

Writes are atomic: a candidate is written under a temporary name and moved to its final
name when complete, so a reader lists and reads whole candidates only. The pending protocol
needs a local (or network) filesystem shared by the writers.
"""

from __future__ import annotations

import logging
import os
import re
import zlib
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from . import fs as _fs
from .candidate_file import (
    open_source,
    read_value_ranges,
    write_candidate_file,
    write_value_ranges,
    write_zero_candidate_file,
)
from .metadata import StoreMetadata
from .ranges import Ranges
from .schema import json_dumps

logger = logging.getLogger(__name__)

__all__ = ["StoreWrites", "rows_checksum"]


def rows_checksum(values: torch.Tensor) -> int:
    """CRC-32 of ``values`` (any shape, floating dtype and device) as a candidate file stores
    them: float32, little-endian, in flat order. Equal for a writer's values as it wrote them
    (:meth:`StoreWrites.write_rows`) and as read back (:meth:`StoreWrites.read_rows`); 0 for none.
    Below 2**32, so exact in a float64 all-reduce."""
    flat = values.detach().to(device="cpu", dtype=torch.float32).reshape(-1).numpy()
    return zlib.crc32(np.ascontiguousarray(flat, dtype="<f4").view(np.uint8))


class StoreWrites(StoreMetadata):
    """The writing methods of ``CandidateStore``."""

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

    # ------------------------------------------------------------------ writing in pieces
    def begin_candidate(self, info: Mapping[str, Any] | None = None) -> str:
        """Start a candidate that several writers fill in pieces (e.g. ranks, each its element ranges).

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
                or a list of increasing, non-overlapping ones (:mod:`.ranges`); pieces
                of different writers must not overlap.
            values: shape (sum of (end - start),), any floating dtype and device: the ranges'
                values concatenated in store order (e.g. a rank's local shards, flattened).
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
        return json_dumps(dict(info), "candidate info")

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
