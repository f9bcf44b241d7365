"""Collectives of small values over the default process group: metrics, flags, buffers,
byte counts. Both stages' workers and the sharding modes use them.

Every function here is a collective: every rank calls it at the same point, in the same
order. Without a process group (tests, one process) it acts on this process alone.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """Whether a default process group is up."""
    return dist.is_available() and dist.is_initialized()


def group_size() -> int:
    """Ranks of the default process group (1 without one)."""
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Sum of a small tensor over ranks, returned on ``t``'s device (a collective).

    The reduction runs on ``device``, this rank's device: NCCL takes GPU tensors only.
    ``t`` may be overwritten.
    """
    if group_size() == 1:
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
    world = group_size()
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


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` (picklable) on every rank (a collective; ``obj`` itself without a process group)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(device: torch.device) -> None:
    """Wait for every rank (a collective); on a GPU, NCCL's barrier on this rank's ``device``."""
    if not is_distributed():
        return
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()
