"""A sharded Ray Train checkpoint read where it lies: each rank fetches only the bytes it loads.

``ray.train.Checkpoint.as_directory()`` copies a remote checkpoint (S3, GCS, ...) whole into
a local folder: with ``sharding: fsdp`` every rank's ``.distcp`` file to every worker, the
full model and optimizer state on each. Here a rank reads with pyarrow from
``checkpoint.filesystem`` at ``checkpoint.path``:

1. ``.metadata`` (DCP's index: per tensor its saved chunks, per chunk its file and bytes),
   unpickled as ``parallel.checkpoint_files.load_sharded`` does, with its storage entries checked;
2. of the ``.distcp`` files, only the byte ranges of the chunks that overlap what it loads
   (its part of each DTensor, the whole of a plain tensor), into sparse local files of the
   remote sizes: with the number of ranks that saved it, its own file's chunks; with
   another number (DCP reshards), the chunks of the files its part crosses;
3. ``parallel.checkpoint_files.load_sharded`` of that local folder, which reads just those bytes.

The state file and JSON info are read alone (``checkpoints.load_ray_checkpoint``). A
checkpoint on the local filesystem is read in place, as before.
"""
from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
from typing import Any, Iterator, Mapping, Sequence

import torch

from ..parallel.checkpoint_files import SHARDED_METADATA, _dcp_io, _flat, load_sharded, read_sharded
from .checkpoints import _is_local, read_checkpoint_file

__all__ = ["has_shards", "load_shards", "read_shards"]

_READ_BYTES = 64 << 20  # the most bytes one ranged read asks for

Region = tuple[Sequence[int], Sequence[int]]  # (offsets, sizes) of a block of a tensor


def has_shards(checkpoint: Any) -> bool:
    """Whether a ``ray.train.Checkpoint`` holds sharded state (DCP's ``.metadata``)."""
    import pyarrow.fs as pafs

    path = f"{checkpoint.path.rstrip('/')}/{SHARDED_METADATA}"
    return checkpoint.filesystem.get_file_info(path).type == pafs.FileType.File


def load_shards(checkpoint: Any, sharded: dict[str, Any], *, no_dist: bool = False) -> None:
    """``parallel.checkpoint_files.load_sharded`` of ``sharded`` from a ``ray.train.Checkpoint`` (or a local
    folder), reading only ``.metadata`` and the bytes of the chunks this rank loads.

    Args:
        sharded: nested dicts of tensors (DTensors: this rank's shards), filled in place.
    Raises:
        ValueError: as ``load_sharded``; or ``.metadata`` names a file that is not a plain
            file name of the checkpoint folder, or bytes past the end of its file.
    """
    if not hasattr(checkpoint, "filesystem"):  # a folder (a Checkpoint is os.PathLike too, and refuses it)
        load_sharded(checkpoint, sharded, no_dist=no_dist)
    elif _is_local(checkpoint):
        load_sharded(checkpoint.path, sharded, no_dist=no_dist)
    else:
        with _partial_copy(checkpoint) as copy:
            copy.fetch({key: _regions(value) for key, value in _flat(sharded)})
            load_sharded(copy.folder, sharded, no_dist=no_dist)


def read_shards(checkpoint: Any, prefix: str, shapes: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    """``parallel.checkpoint_files.read_sharded`` from a ``ray.train.Checkpoint``: {name: full tensor} of the
    keys ``<prefix>.<name>`` for the names of ``shapes``, read by this process alone, fetching
    those keys' chunks only (not the rest of the checkpoint: an optimizer's state, say)."""
    if _is_local(checkpoint):
        return read_sharded(checkpoint.path, prefix, shapes)
    with _partial_copy(checkpoint) as copy:
        copy.fetch({f"{prefix}.{name}": [((0,) * len(shape), tuple(shape))] for name, shape in shapes.items()})
        return read_sharded(copy.folder, prefix, shapes)


def _regions(value: torch.Tensor) -> list[Region]:
    """The blocks of its full tensor that ``value`` holds: a DTensor's local chunks (none when
    this rank holds no part of it), else the whole tensor."""
    if hasattr(value, "__create_chunk_list__"):
        return [(tuple(c.offsets), tuple(c.sizes)) for c in value.__create_chunk_list__()]
    return [((0,) * value.dim(), tuple(value.shape))]


def _overlap(a: Region, b: Region) -> bool:
    """Whether two blocks of one tensor share an element (a 0-d tensor: always)."""
    return all(max(oa, ob) < min(oa + sa, ob + sb) for oa, sa, ob, sb in zip(a[0], a[1], b[0], b[1]))


@contextlib.contextmanager
def _partial_copy(checkpoint: Any) -> Iterator["_PartialCopy"]:
    with tempfile.TemporaryDirectory(prefix="twa-shards-") as folder:
        yield _PartialCopy(checkpoint, folder)


class _PartialCopy:
    """A local ``folder`` holding a remote sharded checkpoint's ``.metadata`` (read on
    creation) and, of its other files, only the byte ranges :meth:`fetch` copied: sparse files
    of the remote files' sizes (holes elsewhere, which no planned read touches)."""

    def __init__(self, checkpoint: Any, folder: str) -> None:
        self.fs, self.root, self.folder = checkpoint.filesystem, checkpoint.path.rstrip("/"), folder
        data = read_checkpoint_file(checkpoint, SHARDED_METADATA)
        if data is None:
            raise ValueError(f"checkpoint {self.root} holds no sharded state (no {SHARDED_METADATA}): it was not made "
                             "with sharding: fsdp")
        with open(os.path.join(folder, SHARDED_METADATA), "wb") as f:
            f.write(data)
        self.metadata = _dcp_io()[0](folder).read_metadata()  # DCP's classes only; storage entries checked

    def fetch(self, wanted: Mapping[str, list[Region]]) -> None:
        """Copy the stored chunks of the keys of ``wanted`` that overlap one of its blocks."""
        spans: dict[str, list[tuple[int, int]]] = {}
        for index, where in self.metadata.storage_data.items():
            blocks = wanted.get(index.fqn)
            chunks = getattr(self.metadata.state_dict_metadata.get(index.fqn), "chunks", ())
            chunk = next((c for c in chunks if tuple(c.offsets) == tuple(index.offset or ())), None)
            if blocks and chunk is not None and any(_overlap((chunk.offsets, chunk.sizes), b) for b in blocks):
                spans.setdefault(where.relative_path, []).append((where.offset, where.offset + where.length))
        for name, ranges in spans.items():
            self._copy(name, sorted(ranges))

    def _copy(self, name: str, ranges: list[tuple[int, int]]) -> None:
        """Copy ``ranges`` (sorted [start, end) byte ranges) of the checkpoint's file ``name``."""
        if name in ("", ".", "..") or posixpath.basename(name) != name or "\\" in name or "\0" in name:
            raise ValueError(f"checkpoint {self.root}: its {SHARDED_METADATA} names the file {name!r}, not a file of "
                             "the checkpoint folder: refused")
        remote = f"{self.root}/{name}"
        size = self.fs.get_file_info(remote).size
        if size is None:
            raise ValueError(f"checkpoint {self.root}: its {SHARDED_METADATA} names {name!r}, which it does not hold")
        last = max(end for _, end in ranges)
        if ranges[0][0] < 0 or last > size or any(end < start for start, end in ranges):
            raise ValueError(f"checkpoint {self.root}: its {SHARDED_METADATA} puts chunks at bytes {ranges[0][0]}.."
                             f"{last} of {name!r}, which holds {size} bytes: refused")
        with self.fs.open_input_file(remote) as src, open(os.path.join(self.folder, name), "wb") as dst:
            dst.truncate(size)
            done = 0  # chunks may share bytes: each is read once
            for start, end in ranges:
                for at in range(max(start, done), end, _READ_BYTES):
                    data = src.read_at(min(_READ_BYTES, end - at), at)
                    if len(data) != min(_READ_BYTES, end - at):
                        raise ValueError(f"checkpoint {self.root}: a short read of {name!r} at byte {at}")
                    dst.seek(at)
                    dst.write(data)
                done = max(done, end)
