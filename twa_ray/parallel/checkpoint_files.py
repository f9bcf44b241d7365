"""The checkpoint folder format of base training and TWA: a torch state file plus a small
JSON info file, and with ``sharding: fsdp`` the sharded state in
``torch.distributed.checkpoint`` (DCP) files. Plain PyTorch; reporting such a folder to Ray
Train and reading it back from where Ray keeps it is ``twa_ray.runtime.checkpoints``.

A checkpoint folder holds

    state.pt    torch.save of a dict of tensors / state_dicts (model, optimizer, ...);
                read back with torch.load(weights_only=True), so it never runs pickled code
    info.json   plain JSON (epoch, step, metrics history, ...): readable without torch
    <extra>.pt  optional further torch files (TWA's final result), read the same way
    .metadata, __<rank>_0.distcp
                ``sharding: fsdp`` only: DCP's files of the sharded tensors, a .distcp per
                rank holding that rank's shards (:func:`save_sharded`)

Sharded state: every rank saves its shards (:func:`save_sharded`, a collective) into its own
folder or one shared folder; a rank reads back only its shards (:func:`load_sharded`; another
worker count reshards), one process the full tensors (:func:`read_sharded`).

DCP reads tensors with ``torch.load(weights_only=True)``, but it unpickles ``.metadata``
with plain ``pickle`` and non-tensor values with ``weights_only=False``: here ``.metadata``
goes through an unpickler that builds only DCP's metadata classes, and a checkpoint that
holds a non-tensor value for a requested key is refused, so loading runs no pickled code.
``.metadata`` also names the file and byte range of every entry: one outside the
checkpoint folder (an absolute or ``..`` path, a link leading out) or past the end of its
file is refused before any byte is read, and tensors are allocated in the caller's
shapes only, never in sizes the metadata alone gives (:func:`read_sharded`).
"""
from __future__ import annotations

import functools
import json
import os
import pathlib
import pickle
import stat
import warnings
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

STATE_FILE = "state.pt"
INFO_FILE = "info.json"
SHARDED_METADATA = ".metadata"  # DCP's: present in a checkpoint with sharded state


def save_checkpoint(folder: str | os.PathLike, state: dict[str, Any], info: dict[str, Any] | None = None,
                    extra: dict[str, dict[str, Any]] | None = None) -> None:
    """Write ``state`` (torch.save), ``info`` (JSON) and each ``extra`` {file name: dict} into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    torch.save(state, os.path.join(folder, STATE_FILE))
    for name, content in (extra or {}).items():
        torch.save(content, os.path.join(folder, name))
    with open(os.path.join(folder, INFO_FILE), "w") as f:
        json.dump(info or {}, f, indent=1)


def load_checkpoint(folder: str | os.PathLike, map_location: str | torch.device = "cpu",
                    name: str = STATE_FILE) -> dict[str, Any]:
    """The state dict (or the ``extra`` file ``name``) saved by :func:`save_checkpoint` (``weights_only=True``)."""
    return torch.load(os.path.join(folder, name), map_location=map_location, weights_only=True)


def load_checkpoint_info(folder: str | os.PathLike) -> dict[str, Any]:
    """The JSON info saved by :func:`save_checkpoint` ({} when there is none)."""
    path = os.path.join(folder, INFO_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def is_sharded(folder: str | os.PathLike) -> bool:
    """Whether the checkpoint folder holds sharded state (DCP files)."""
    return os.path.exists(os.path.join(folder, SHARDED_METADATA))


def save_sharded(folder: str | os.PathLike, sharded: dict[str, Any]) -> None:
    """``dcp.save`` of ``sharded`` (nested dicts of tensors; DTensors: this rank's shards)
    into ``folder``: this rank's ``__<rank>_0.distcp``, and on rank 0 ``.metadata``. A
    collective: every rank calls it with the same keys, each with its own folder or one
    shared folder."""
    import torch.distributed.checkpoint as dcp

    _check_tensors(sharded, "sharded state")
    dcp.save(sharded, storage_writer=dcp.FileSystemWriter(folder))


def load_sharded(folder: str | os.PathLike, sharded: dict[str, Any], *, no_dist: bool = False) -> None:
    """``dcp.load`` into ``sharded`` in place: each DTensor gets this rank's shards, reading
    only them; each plain tensor its whole value. The checkpoint may come from another
    number of ranks (DCP reshards). A collective unless ``no_dist`` or there is no process
    group. Raises ValueError naming a key the checkpoint lacks or holds with another shape,
    or a storage entry that names a file outside ``folder`` (:func:`_dcp_io`)."""
    _check_tensors(sharded, "sharded state")
    if not is_sharded(folder):
        raise ValueError(f"checkpoint {folder} holds no sharded state (no {SHARDED_METADATA}): it was not made "
                         "with sharding: fsdp")
    stored = _dcp_io()[0](folder).read_metadata().state_dict_metadata
    _check_shapes(folder, stored, ((key, value.shape) for key, value in _flat(sharded)))
    _dcp_load(folder, sharded, no_dist=no_dist)


def _dcp_load(folder: str | os.PathLike, sharded: dict[str, Any], *, no_dist: bool) -> None:
    """``dcp.load`` of ``sharded`` from ``folder`` with the reader and planner of
    :func:`_dcp_io`. A refusal of theirs (ValueError) on every failing rank is raised as
    that ValueError (the lowest rank's), not as DCP's CheckpointException around it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    reader, planner = _dcp_io()
    with warnings.catch_warnings():
        if no_dist:  # DCP warns that it loads in one process: what was asked
            warnings.filterwarnings("ignore", message="torch.distributed is .* single process")
        try:
            dcp.load(sharded, storage_reader=reader(folder), planner=planner(), no_dist=no_dist)
        except CheckpointException as exc:
            failures = [failure for _, (failure, _) in sorted(exc.failures.items())]
            if failures and all(isinstance(f, ValueError) for f in failures):
                raise failures[0] from exc
            raise


def read_sharded(folder: str | os.PathLike, prefix: str,
                 shapes: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    """{name: full tensor} of the keys ``<prefix>.<name>`` of a checkpoint's sharded state, one
    for each name of ``shapes`` (the model's entries: {name: shape}), read by this process
    alone (no collective), on CPU, in the checkpoint's dtype; {} when the checkpoint holds
    no tensor under ``prefix`` (a part it was saved without, such as an EMA).

    The model decides what is allocated: a key of the checkpoint that ``shapes`` lacks is
    neither allocated nor read, and a name the checkpoint lacks or holds with another shape
    raises ValueError naming the key, before anything is allocated."""
    stored = _dcp_io()[0](folder).read_metadata().state_dict_metadata
    lead = prefix + "."
    if not any(key.startswith(lead) and hasattr(m, "size") for key, m in stored.items()):
        return {}
    _check_shapes(folder, stored, ((lead + name, shape) for name, shape in shapes.items()))
    full = {name: torch.empty(tuple(shape), dtype=stored[lead + name].properties.dtype)
            for name, shape in shapes.items()}
    if full:
        load_sharded(folder, {prefix: full}, no_dist=True)
    return full


def _flat(tree: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(DCP key, leaf) of nested dicts: keys joined with dots, as DCP flattens them."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat(v, f"{prefix}{k}.")
    else:
        yield prefix[:-1], tree


def _check_shapes(folder: str | os.PathLike, stored: Mapping[str, Any],
                  wanted: Iterable[tuple[str, Sequence[int]]]) -> None:
    """Raise ValueError naming the first (DCP key, shape) of ``wanted`` that the checkpoint's
    ``stored`` (its ``state_dict_metadata``) lacks as a tensor or holds with another shape."""
    for key, shape in wanted:
        meta = stored.get(key)
        if meta is None or not hasattr(meta, "size"):
            raise ValueError(f"checkpoint {folder} holds no tensor {key!r} (it has {len(stored)} keys)")
        if tuple(meta.size) != tuple(shape):
            raise ValueError(f"checkpoint {folder}: {key!r} has shape {list(meta.size)}, expected {list(shape)}")


def _check_tensors(tree: dict[str, Any], what: str) -> None:
    bad = [key for key, value in _flat(tree) if not torch.is_tensor(value)]
    if bad:
        raise TypeError(f"{what} holds only tensors; not: {bad[:5]}")


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata classes, torch dtypes and sizes, paths: nothing else."""

    ALLOWED = {
        "torch.distributed.checkpoint.metadata": {
            "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties",
            "ChunkStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.serialization": {"_get_layout"},
        "torch": {"Size"},
        "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
        "collections": {"OrderedDict"},
    }

    def find_class(self, module: str, name: str) -> Any:
        if name in self.ALLOWED.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                     torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}: not DCP metadata, not loaded")


def _check_storage_entries(folder: str | os.PathLike, metadata: Any) -> None:
    """Raise ValueError, naming ``folder`` and the key, for a storage entry of the unpickled
    ``.metadata`` that is malformed, names a file outside ``folder`` (an absolute path, a
    ``..`` component) or is stored with DCP's stream transforms (decompression: never
    written here). Reads no file: :func:`_check_reads` checks the files themselves."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict) \
            or not isinstance(metadata.state_dict_metadata, dict):
        raise ValueError(f"checkpoint {folder}: {SHARDED_METADATA} is not DCP metadata: refused")
    for index, info in metadata.storage_data.items():
        key = getattr(index, "fqn", index)
        if not (isinstance(info, _StorageInfo) and isinstance(info.relative_path, str)
                and all(type(n) is int for n in (info.offset, info.length))):
            raise ValueError(f"checkpoint {folder}: {key!r} has malformed storage information {info!r}: refused")
        path = info.relative_path
        if not path or "\0" in path or os.path.isabs(path) or ".." in pathlib.PurePosixPath(path).parts:
            raise ValueError(f"checkpoint {folder}: {key!r} is stored in {path!r}, outside the checkpoint "
                             "folder: refused")
        if info.transform_descriptors:
            raise ValueError(f"checkpoint {folder}: {key!r} is stored with transforms "
                             f"{list(info.transform_descriptors)}, which this library never writes: refused")


def _check_reads(folder: str | os.PathLike, storage_data: Mapping[Any, Any], items: Iterable[Any]) -> None:
    """Raise ValueError, naming ``folder``, the key and the file, before any byte is read, for
    a read of ``items`` (DCP's ReadItems of a load plan) from a file that leads out of
    ``folder`` (a link), is not a regular file, or ends before the entry's byte range."""
    root = os.path.realpath(folder)
    files: dict[str, os.stat_result] = {}
    for item in items:
        info = storage_data[item.storage_index]
        key, path = item.storage_index.fqn, info.relative_path
        if path not in files:
            real = os.path.realpath(os.path.join(root, path))
            if os.path.commonpath([root, real]) != root:
                raise ValueError(f"checkpoint {folder}: {key!r} is stored in {path!r}, which leads to {real}, "
                                 "outside the checkpoint folder: refused")
            files[path] = os.stat(real)
            if not stat.S_ISREG(files[path].st_mode):
                raise ValueError(f"checkpoint {folder}: {key!r} is stored in {path!r}, not a regular file: refused")
        size, start, end = files[path].st_size, info.offset, info.offset + info.length
        if start < 0 or end < start or end > size:
            raise ValueError(f"checkpoint {folder}: {key!r} is stored at bytes {start}..{end} of {path!r}, which "
                             f"holds {size} bytes: refused")


@functools.cache
def _dcp_io() -> tuple[type, type]:
    """(reader, planner) classes for ``dcp.load``: DCP's FileSystemReader with ``.metadata``
    read by :class:`_MetadataUnpickler` and its storage entries checked (no file outside
    the checkpoint folder, no byte range past a file: :func:`_check_storage_entries`,
    :func:`_check_reads`), and its DefaultLoadPlanner refusing non-tensor values (DCP
    would ``torch.load`` them with weights_only=False). Built on first use, so that only
    runs with sharded state import DCP."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            with open(pathlib.Path(self.path) / SHARDED_METADATA, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            _check_storage_entries(self.path, metadata)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

        def read_data(self, plan: Any, planner: Any) -> Any:
            _check_reads(self.path, self.storage_data, plan.items)  # every file of the plan, before reading
            return super().read_data(plan, planner)

    class TensorsOnlyPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            raise ValueError(f"the checkpoint holds {read_item.dest_index.fqn!r} as a pickled object, not a "
                             "tensor: refused (loading it would run pickled code)")

    return SafeReader, TensorsOnlyPlanner
