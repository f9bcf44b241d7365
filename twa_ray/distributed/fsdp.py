"""FSDP2 helpers both stages share (base training's and TWA's ``sharding: fsdp``).

``fsdp_wrap`` shards a model with ``torch.distributed.fsdp.fully_shard``: every trainable
parameter becomes a DTensor of which rank r holds rows ``store.fsdp_row_range(shape, r, k)``
of dim 0 (its local shard, ``local_shard``). The rest moves state between that layout and
full tensors: ``gather_full`` (checkpoints), ``shard_like`` / ``local_rows`` (resuming
from them), and ``broadcast_buffers`` (the unsharded buffers, as DDP keeps them).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..core.params import trainable_parameters
from ..store import fsdp_row_range


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def fsdp_wrap(model: nn.Module, world: int, device: torch.device) -> nn.Module:
    """``model`` (on ``device``) under FSDP2 over all ``world`` ranks: every module that holds
    parameters of its own is an all-gather unit, then the root. Gradients are summed over
    ranks, not averaged (each rank's loss is already its share of the global batch mean).
    One rank and no process group: the model as it is."""
    if world == 1 and not _distributed():
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for module in list(model.modules())[1:]:
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM
    return model


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the tensor itself when not distributed)."""
    return t.to_local() if hasattr(t, "to_local") else t


def local_param_bytes(model: nn.Module) -> int:
    """Bytes of the trainable parameters this rank holds (its FSDP shards, or the whole model)."""
    return sum(local_shard(p).numel() * local_shard(p).element_size() for p in trainable_parameters(model))


def local_rows(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """``rank``'s dim-0 rows of ``full`` (shape (R, ...)) under FSDP2's rule (a view)."""
    start, end = fsdp_row_range(full.shape, rank, world)
    return full[start:end]


def shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``full`` (``param``'s full shape) laid out like ``param``: a DTensor holding this rank's
    rows on ``param``'s device when ``param`` is one, else ``full`` on its device. No communication."""
    if not hasattr(param, "device_mesh"):
        return full.to(param.device)
    from torch.distributed.tensor import DTensor

    mesh = param.device_mesh
    rows = local_rows(full, mesh.get_local_rank(), mesh.size()).to(param.device).clone()
    return DTensor.from_local(rows, mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride())


def full_like(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The full tensor whose rows on each rank are that rank's ``local`` (shaped like
    ``param``'s local shard): an all-gather when ``param`` is a DTensor, else ``local``."""
    if not hasattr(param, "device_mesh"):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride()).full_tensor()


def gather_full(obj: Any) -> Any:
    """``obj`` (a state dict: nested dicts, lists and tuples) with every DTensor replaced by
    its full tensor on CPU; other values as they are. A collective when ``obj`` holds
    DTensors: every rank calls it with the same structure."""
    if hasattr(obj, "full_tensor"):
        return obj.full_tensor().cpu()
    if isinstance(obj, dict):
        return {k: gather_full(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(gather_full(v) for v in obj)
    return obj


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics: FSDP2 does not shard them) on every rank, as
    DDP does before each forward pass (a collective; nothing without a process group)."""
    if not _distributed() or dist.get_world_size() == 1:
        return
    for buf in model.buffers():
        dist.broadcast(buf, src=0)
