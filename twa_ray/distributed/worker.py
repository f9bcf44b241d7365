"""What both Ray Train worker loops (base training, TWA) share: seeding, the collectives
their metrics and checkpoints need, evaluation across ranks, SyncBatchNorm, fault
injection and reporting in the one checkpoint format (``checkpoints.py``). Their logging
is ``output.console.setup_logging(rank=...)``.

Every function that says "a collective" must be called by every rank at the same point,
in the same order. Without a process group (tests, one process) they act on this
process alone.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, Subset

from ..store import fs as store_fs
from .checkpoints import ray_checkpoint
from .evaluate import EvalResult, evaluate

log = logging.getLogger(__name__)

PAUSE_S = 600  # debug pause_at_*: long enough for a drill to interrupt the run


def seed_rng(seed: int, counter: int, rank: int) -> None:
    """Seed torch's generators (CPU and every GPU) for unit ``counter`` (an epoch, a step)
    of ``rank``. Dropout and the data transforms draw from them, so a run resumed at that
    unit replays the same masks and augmentations as an uninterrupted one."""
    torch.manual_seed(seed * 1_000_003 + counter * 1_009 + rank)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Sum of a small tensor over ranks, returned on ``t``'s device (a collective).

    The reduction runs on ``device``, this rank's device: NCCL takes GPU tensors only.
    ``t`` may be overwritten.
    """
    if _world() == 1:
        return t
    work = t.to(device)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(t.device)


def gather_from_ranks(tensors: dict[str, torch.Tensor], device: torch.device | str) -> list[dict[str, torch.Tensor]]:
    """Every rank's ``tensors`` (the same names, shapes and dtypes on every rank), on CPU,
    indexed by rank (a collective).

    They travel as one float64 vector on ``device``: exact for float32/16 values and for
    integers below 2**53 (BatchNorm's running statistics and batch counts).
    """
    world = _world()
    own = {name: t.detach().cpu().clone() for name, t in tensors.items()}
    if not own:
        return [{} for _ in range(world)]
    if world == 1:
        return [own]
    flat = torch.cat([t.reshape(-1).to(device, torch.float64) for t in own.values()])
    parts = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(parts, flat)
    gathered = []
    for part in parts:
        chunks = part.cpu().split([t.numel() for t in own.values()])
        gathered.append({name: c.to(t.dtype).reshape(t.shape) for (name, t), c in zip(own.items(), chunks)})
    return gathered


def evaluate_across_ranks(
    model: nn.Module, data: Dataset, rank: int, world: int, device: torch.device | str, batch_size: int,
    lockstep: bool = False,
) -> EvalResult:
    """Accuracy and mean loss of ``model`` on ``data``: rank r evaluates examples r, r + world, ...,
    and the sums are all-reduced, so every rank returns the result on all of ``data`` (a collective).
    ``lockstep``: every rank makes as many forward passes (a model sharded with FSDP)."""
    indices = list(range(rank, len(data), world))
    batches = -(-len(range(0, len(data), world)) // batch_size) if lockstep else 0  # rank 0's, the most
    if not indices and batches:  # fewer examples than ranks: forward passes on one example, not counted
        evaluate(model, Subset(data, [0]), device, batch_size=batch_size, min_batches=batches)
    res = evaluate(model, Subset(data, indices), device, batch_size=batch_size, min_batches=batches if indices else 0)
    sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
    if res.count:
        sums = torch.tensor([res.loss * res.count, round(res.accuracy * res.count / 100.0), res.count],
                            dtype=torch.float64)
    sums = all_reduce_sum(sums, device)
    count = int(sums[2])
    if count == 0:
        return EvalResult(math.nan, math.nan, 0)
    return EvalResult(100.0 * float(sums[1]) / count, float(sums[0]) / count, count)


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
    ``sharded``: every rank's own shards (``checkpoints.save_sharded``), or None on every rank."""
    import ray.train

    with ray_checkpoint(state, info, extra, sharded) as checkpoint:
        ray.train.report(metrics, checkpoint=checkpoint)
