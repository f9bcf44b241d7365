"""What both Ray Train worker loops (base training, TWA) share: seeding, SyncBatchNorm, fault
injection and reporting in the one checkpoint format (``checkpoints.py``). The collectives of
their metrics and checkpoints are ``parallel.process_group``'s, evaluation across ranks is
``parallel.evaluate``'s, their logging ``output.console.setup_logging(rank=...)``.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from ..store import fs as store_fs
from .checkpoints import ray_checkpoint

log = logging.getLogger(__name__)

PAUSE_S = 600  # debug pause_at_*: long enough for a drill to interrupt the run


def seed_rng(seed: int, counter: int, rank: int) -> None:
    """Seed torch's generators (CPU and every GPU) for unit ``counter`` (an epoch, a step)
    of ``rank``. Dropout and the data transforms draw from them, so a run resumed at that
    unit replays the same masks and augmentations as an uninterrupted one."""
    torch.manual_seed(seed * 1_000_003 + counter * 1_009 + rank)


def sync_batchnorm(model: nn.Module, enabled: bool, device: torch.device, rank: int, world: int) -> nn.Module:
    """``model`` with SyncBatchNorm when ``enabled`` (``model.sync_bn``) and more than one
    rank runs on accelerators; torch's SyncBatchNorm rejects CPU tensors, so CPU workers
    keep their own batch statistics (a warning says so)."""
    if not enabled or world == 1:
        return model
    if device.type == "cpu":
        if rank == 0:
            log.warning("model.sync_bn ignored: SyncBatchNorm needs GPUs; each CPU worker keeps its own batch statistics")
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def inject_fault(
    stage: str, unit: str, position: int, rank: int, world: int, marker_dir: str,
    *, fail_at: int | None = None, pause_at: int | None = None,
) -> None:
    """Drills and tests (``debug.*``): at ``position`` the last rank raises (``fail_at``) or
    stalls for ``PAUSE_S`` seconds (``pause_at``), once per marker folder.

    The marker ``<marker_dir>/<stage>-<failed|paused>-at-<unit>-<position>`` is created
    atomically (on any filesystem store_fs opens) before acting, so the restarted worker
    group gets past the fault.
    """
    if rank != world - 1:
        return
    for kind, at in (("failed", fail_at), ("paused", pause_at)):
        if at != position:
            continue
        loc = store_fs.resolve(marker_dir)
        loc.fs.create_dir(loc.path, recursive=True)
        marker = store_fs.join(loc.path, f"{stage}-{kind}-at-{unit}-{position}")
        if not store_fs.write_bytes_atomic(loc.fs, marker, b"", overwrite=False):
            continue
        if kind == "failed":
            raise RuntimeError(f"debug: injected failure of rank {rank} at {stage} {unit} {position} (once; marker {marker})")
        log.warning("debug: rank %d pauses at %s %s %d for up to %d s (marker %s)", rank, stage, unit, position, PAUSE_S, marker)
        time.sleep(PAUSE_S)


def report(metrics: dict[str, Any], state: dict[str, Any] | None = None, info: dict[str, Any] | None = None,
           extra: dict[str, dict[str, Any]] | None = None, sharded: dict[str, Any] | None = None) -> None:
    """``ray.train.report`` of ``metrics``, every rank at the same point; the rank that holds
    the checkpoint (rank 0) passes its ``state``, ``info`` and ``extra`` files, the others None.
    ``sharded``: every rank's own shards (``parallel.checkpoint_files.save_sharded``), or None
    on every rank."""
    import ray.train

    with ray_checkpoint(state, info, extra, sharded) as checkpoint:
        ray.train.report(metrics, checkpoint=checkpoint)
