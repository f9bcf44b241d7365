"""Ray Train checkpoints in the one folder format (``twa_ray.parallel.checkpoint_files``):
reported by the workers of both stages, read back where Ray keeps them.

Workers report one with::

    with ray_checkpoint(state, info) as ckpt:      # ckpt is None when state is None
        ray.train.report(metrics, checkpoint=ckpt)

and restore with ``state, info = load_ray_checkpoint(ray.train.get_checkpoint())``.

Sharded state: every rank passes ``ray_checkpoint(..., sharded=its DCP state dict)``; each
writes its own temporary folder (rank 0's also holds state.pt, info.json and DCP's
.metadata) and reports it, and Ray Train 2.60 copies every rank's folder into the one
checkpoint directory (``ray.train.report``; ``StorageContext.persist_current_checkpoint``
into the name rank 0 broadcast) and registers it once every rank has reported. A resumed
rank reads only its shards, and from a remote checkpoint fetches only their bytes
(``checkpoint_reads.load_shards``; the state and info files alone: :func:`load_ray_checkpoint`).
"""
from __future__ import annotations

import contextlib
import io
import json
import tempfile
from typing import Any, Iterator

import torch

from ..parallel.checkpoint_files import INFO_FILE, STATE_FILE, load_checkpoint, save_checkpoint, save_sharded

CHECKPOINTS_TO_KEEP = 2  # Ray Train's CheckpointConfig(num_to_keep): the latest ones stay


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


def load_ray_checkpoint(checkpoint: Any, map_location: str | torch.device = "cpu", with_state: bool = True,
                        name: str = STATE_FILE) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(state, info) of a ``ray.train.Checkpoint``: its state file (or the ``extra`` file
    ``name``; None when ``with_state`` is False) and JSON info, read straight from where the
    checkpoint lies (:func:`read_checkpoint_file`): those two files only, never the sharded
    state beside them (``checkpoint_reads.load_shards`` reads a rank's part of that)."""
    info = read_checkpoint_file(checkpoint, INFO_FILE)
    info = json.loads(info) if info is not None else {}
    if not with_state:
        return None, info
    if _is_local(checkpoint):
        return load_checkpoint(checkpoint.path, map_location, name), info
    data = read_checkpoint_file(checkpoint, name)
    if data is None:
        raise FileNotFoundError(f"checkpoint {checkpoint.path} holds no {name}")
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True), info


def read_checkpoint_file(checkpoint: Any, name: str) -> bytes | None:
    """The bytes of the file ``name`` of a ``ray.train.Checkpoint``, read with pyarrow from its
    ``filesystem`` at its ``path``: that file alone, where ``Checkpoint.as_directory`` copies a
    remote checkpoint whole (every rank's shards). None when the checkpoint has no such file."""
    import pyarrow.fs as pafs

    path = f"{checkpoint.path.rstrip('/')}/{name}"
    if checkpoint.filesystem.get_file_info(path).type != pafs.FileType.File:
        return None
    with checkpoint.filesystem.open_input_stream(path) as f:
        return f.read()


def _is_local(checkpoint: Any) -> bool:
    """Whether a ``ray.train.Checkpoint`` lies on the local filesystem (its path is a folder here)."""
    import pyarrow.fs as pafs

    return isinstance(checkpoint.filesystem, pafs.LocalFileSystem)
