"""Ray Train checkpoint folders, the one format of base training and TWA: a torch state
file plus a small JSON info file, and with ``sharding: fsdp`` the sharded state in
``torch.distributed.checkpoint`` (DCP) files.

A checkpoint folder holds

    state.pt    torch.save of a dict of tensors / state_dicts (model, optimizer, ...);
                read back with torch.load(weights_only=True), so it never runs pickled code
    info.json   plain JSON (epoch, step, metrics history, ...): readable without torch
    <extra>.pt  optional further torch files (TWA's final result), read the same way
    .metadata, __<rank>_0.distcp
                ``sharding: fsdp`` only: DCP's files of the sharded tensors, a .distcp per
                rank holding that rank's shards (:func:`save_sharded`)

Workers report one with::

    with ray_checkpoint(state, info) as ckpt:      # ckpt is None when state is None
        ray.train.report(metrics, checkpoint=ckpt)

and restore with ``state, info = load_ray_checkpoint(ray.train.get_checkpoint())``.

Sharded state: every rank passes ``ray_checkpoint(..., sharded=its DCP state dict)``; each
writes its own temporary folder (rank 0's also holds state.pt, info.json and DCP's
.metadata) and reports it, and Ray Train 2.60 copies every rank's folder into the one
checkpoint directory (``ray.train.report``; ``StorageContext.persist_current_checkpoint``
into the name rank 0 broadcast) and registers it once every rank has reported. A resumed
rank reads only its shards (:func:`load_sharded`; another worker count reshards).

DCP reads tensors with ``torch.load(weights_only=True)``, but it unpickles ``.metadata``
with plain ``pickle`` and non-tensor values with ``weights_only=False``: here ``.metadata``
goes through an unpickler that builds only DCP's metadata classes, and a checkpoint that
holds a non-tensor value for a requested key is refused, so loading runs no pickled code.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import pickle
import tempfile
import warnings
from typing import Any, Iterator

import torch

STATE_FILE = "state.pt"
INFO_FILE = "info.json"
SHARDED_METADATA = ".metadata"  # DCP's: present in a checkpoint with sharded state
CHECKPOINTS_TO_KEEP = 2  # Ray Train's CheckpointConfig(num_to_keep): the latest ones stay


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
    group. Raises ValueError naming a key the checkpoint lacks or holds with another shape."""
    import torch.distributed.checkpoint as dcp

    _check_tensors(sharded, "sharded state")
    if not is_sharded(folder):
        raise ValueError(f"checkpoint {folder} holds no sharded state (no {SHARDED_METADATA}): it was not made "
                         "with sharding: fsdp")
    reader, planner = _dcp_io()
    stored = reader(folder).read_metadata().state_dict_metadata
    for key, value in _flat(sharded):
        meta = stored.get(key)
        if meta is None or not hasattr(meta, "size"):
            raise ValueError(f"checkpoint {folder} holds no tensor {key!r} (it has {len(stored)} keys)")
        if tuple(meta.size) != tuple(value.shape):
            raise ValueError(f"checkpoint {folder}: {key!r} has shape {list(meta.size)}, expected {list(value.shape)}")
    with warnings.catch_warnings():
        if no_dist:  # DCP warns that it loads in one process: what was asked
            warnings.filterwarnings("ignore", message="torch.distributed is .* single process")
        dcp.load(sharded, storage_reader=reader(folder), planner=planner(), no_dist=no_dist)


def read_sharded(folder: str | os.PathLike, prefix: str) -> dict[str, torch.Tensor]:
    """{name: full tensor} of every key ``<prefix>.<name>`` of a checkpoint's sharded state,
    read by this process alone (no collective), on CPU."""
    meta = _dcp_io()[0](folder).read_metadata().state_dict_metadata
    lead = prefix + "."
    full = {key[len(lead):]: torch.empty(tuple(m.size), dtype=m.properties.dtype)
            for key, m in meta.items() if key.startswith(lead) and hasattr(m, "size")}
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


@functools.cache
def _dcp_io() -> tuple[type, type]:
    """(reader, planner) classes for ``dcp.load``: DCP's FileSystemReader with ``.metadata``
    read by :class:`_MetadataUnpickler`, and its DefaultLoadPlanner refusing non-tensor
    values (DCP would ``torch.load`` them with weights_only=False). Built on first use, so
    that only runs with sharded state import DCP."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            with open(pathlib.Path(self.path) / SHARDED_METADATA, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class TensorsOnlyPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            raise ValueError(f"the checkpoint holds {read_item.dest_index.fqn!r} as a pickled object, not a "
                             "tensor: refused (loading it would run pickled code)")

    return SafeReader, TensorsOnlyPlanner


@contextlib.contextmanager
def ray_checkpoint(state: dict[str, Any] | None, info: dict[str, Any] | None = None,
                   extra: dict[str, dict[str, Any]] | None = None,
                   sharded: dict[str, Any] | None = None) -> Iterator[Any]:
    """A ``ray.train.Checkpoint`` of a temporary folder holding ``state``, ``info`` and ``extra``,
    and this rank's shards of ``sharded`` (:func:`save_sharded`: a collective, every rank
    passes its own; Ray merges the ranks' folders into one checkpoint).

    Yields None when ``state`` and ``sharded`` are None (ranks that attach no checkpoint).
    Report inside the ``with``: the folder is deleted afterwards.
    """
    if state is None and sharded is None:
        yield None
        return
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory(prefix="twa-ckpt-") as folder:
        if sharded is not None:
            save_sharded(folder, sharded)
        if state is not None:
            save_checkpoint(folder, state, info, extra)
        yield Checkpoint.from_directory(folder)


def load_ray_checkpoint(checkpoint: Any, map_location: str | torch.device = "cpu",
                        with_state: bool = True) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(state, info) of a ``ray.train.Checkpoint`` (state is None when ``with_state`` is False)."""
    with checkpoint.as_directory() as folder:
        info = load_checkpoint_info(folder)
        state = load_checkpoint(folder, map_location) if with_state else None
    return state, info
