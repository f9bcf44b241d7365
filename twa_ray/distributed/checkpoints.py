"""Ray Train checkpoint folders, the one format of base training and TWA: a torch state
file plus a small JSON info file.

A checkpoint folder holds

    state.pt    torch.save of a dict of tensors / state_dicts (model, optimizer, ...);
                read back with torch.load(weights_only=True), so it never runs pickled code
    info.json   plain JSON (epoch, step, metrics history, ...): readable without torch
    <extra>.pt  optional further torch files (TWA's final result), read the same way

Workers report one with::

    with ray_checkpoint(state, info) as ckpt:      # ckpt is None when state is None
        ray.train.report(metrics, checkpoint=ckpt)

and restore with ``state, info = load_ray_checkpoint(ray.train.get_checkpoint())``.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator

import torch

STATE_FILE = "state.pt"
INFO_FILE = "info.json"
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


@contextlib.contextmanager
def ray_checkpoint(state: dict[str, Any] | None, info: dict[str, Any] | None = None,
                   extra: dict[str, dict[str, Any]] | None = None) -> Iterator[Any]:
    """A ``ray.train.Checkpoint`` of a temporary folder holding ``state``, ``info`` and ``extra``.

    Yields None when ``state`` is None (ranks that attach no checkpoint). Report inside
    the ``with``: the folder is deleted afterwards.
    """
    if state is None:
        yield None
        return
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory(prefix="twa-ckpt-") as folder:
        save_checkpoint(folder, state, info, extra)
        yield Checkpoint.from_directory(folder)


def load_ray_checkpoint(checkpoint: Any, map_location: str | torch.device = "cpu",
                        with_state: bool = True) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(state, info) of a ``ray.train.Checkpoint`` (state is None when ``with_state`` is False)."""
    with checkpoint.as_directory() as folder:
        info = load_checkpoint_info(folder)
        state = load_checkpoint(folder, map_location) if with_state else None
    return state, info
