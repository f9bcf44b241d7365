"""FSDP2's model and tensor layout, which the ``fsdp`` sharding mode uses in both stages
(base training's and TWA's ``sharding: fsdp``).

``fsdp_wrap`` shards a model with ``torch.distributed.fsdp.fully_shard``: every trainable
parameter becomes a DTensor of which rank r holds its part ``core.fsdp_rows.fsdp_shard(shape, r, k)``
(indices of one dim, ``Shard(core.fsdp_rows.fsdp_shard_dim(shape, k))``: dim 0 unless k does not
divide it; its local shard, ``local_shard``). The rest moves state between that layout and
full tensors: ``gather_on_rank0`` (the full weights where one rank writes them: candidates on
object stores, TWA's result), ``local_rows``,
``sharded_by_name`` (a rank's state as DTensors for DCP checkpoints), and
``broadcast_buffers`` (the unsharded buffers, as DDP keeps them).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist
from torch import nn

from ...core.fsdp_rows import fsdp_shard, fsdp_shard_dim
from ...core.params import trainable_parameters
from ..process_group import is_distributed


def fsdp_wrap(model: nn.Module, world: int, device: torch.device) -> nn.Module:
    """``model`` (on ``device``) under FSDP2 over all ``world`` ranks: every outermost module
    that holds parameters of its own is an all-gather unit (with those of its submodules), then
    the root (``planner.fsdp_units``). Each parameter is sharded on
    ``core.fsdp_rows.fsdp_shard_dim`` (dim 0, or a dim k divides when dim 0 would be padded). Gradients
    are summed over ranks, not averaged (each rank's loss is already its share of the global
    batch mean). One rank and no process group: the model as it is."""
    if world == 1 and not is_distributed():
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh(device.type, (world,))

    def placement(param: nn.Parameter) -> Shard:
        return Shard(fsdp_shard_dim(param.shape, world))

    units: list[str] = []
    for name, module in list(model.named_modules())[1:]:
        if any(name.startswith(unit + ".") for unit in units):
            # its parameters are in an enclosing unit already: nn.MultiheadAttention's forward
            # reads out_proj.weight without calling out_proj, so out_proj cannot gather alone
            continue
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            fully_shard(module, mesh=mesh, shard_placement_fn=placement)
            units.append(name)
    fully_shard(model, mesh=mesh, shard_placement_fn=placement)
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
    """``rank``'s part of ``full`` as ``fsdp_wrap`` shards it (``core.fsdp_rows.fsdp_shard``): a view of
    shape ``local_shape``, not contiguous when cut on a dim > 0."""
    part = fsdp_shard(full.shape, rank, world)
    return full.narrow(part.dim, part.start, part.end - part.start)


def sharded_by_name(model: nn.Module, local: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """{name: tensor} over the trainable parameters of ``model`` (layout order): ``local[i]``
    (shaped like parameter i's local shard) laid out like it, a DTensor when the parameter is
    one (so DCP saves or loads just this rank's part; no communication), else ``local[i]``."""
    from torch.distributed.tensor import DTensor

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if len(named) != len(local):
        raise ValueError(f"{len(local)} tensors for {len(named)} trainable parameters")
    return {n: DTensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
            if hasattr(p, "device_mesh") else t for (n, p), t in zip(named, local)}


def gather_on_rank0(parts: Sequence[torch.Tensor], shapes: Sequence[Sequence[int]], rank: int,
                    world: int) -> torch.Tensor | None:
    """The full tensors of which every rank holds a part, on rank 0 only (a collective).

    Args:
        parts: per tensor t, this rank's part of it as ``fsdp_wrap`` shards it
            (``core.fsdp_rows.fsdp_shard(shapes[t], rank, world)``: its ``local_shape``, or those values
            flat), on this rank's device; e.g. ``local_shard(p)`` of every trainable parameter.
        shapes: per tensor, its full shape.
    Returns:
        On rank 0: (D,) float32 on CPU, D = sum of the numels of ``shapes``: the full tensors
        flattened and concatenated in order. On the other ranks: None.

    One ``torch.distributed.gather`` to rank 0 per tensor: the other ranks send their part
    (padded to the largest) and receive nothing, so no rank but 0 ever holds a full tensor;
    rank 0 holds one tensor's gathered parts on the device at a time. One rank and no process
    group: the parts themselves.
    """
    if not is_distributed() or world == 1:
        return torch.cat([part.detach().reshape(-1).to("cpu", torch.float32) for part in parts])
    out = torch.empty(sum(math.prod(shape) for shape in shapes), dtype=torch.float32) if rank == 0 else None
    offset = 0
    for t, (part, shape) in enumerate(zip(parts, shapes)):
        cuts = [fsdp_shard(shape, r, world) for r in range(world)]
        send = part.detach().reshape(-1)
        if send.numel() != cuts[rank].numel:
            raise ValueError(f"tensor {t} of shape {list(shape)}: rank {rank} holds {send.numel()} values, its part "
                             f"is {cuts[rank].numel}")
        pad = max(cut.numel for cut in cuts)
        if pad:
            send = torch.cat([send, send.new_zeros(pad - send.numel())])  # (pad,): a copy, as gather wants
            got = [send.new_empty(pad) for _ in range(world)] if rank == 0 else None
            dist.gather(send, got, dst=0)
            if out is not None:
                full = out[offset : offset + math.prod(shape)].view(tuple(shape))
                for cut, values in zip(cuts, got):
                    full.narrow(cut.dim, cut.start, cut.end - cut.start).copy_(values[: cut.numel].view(cut.local_shape))
        offset += math.prod(shape)
    return out


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics: FSDP2 does not shard them) on every rank, as
    DDP does before each forward pass (a collective; nothing without a process group)."""
    if not is_distributed() or dist.get_world_size() == 1:
        return
    for buf in model.buffers():
        dist.broadcast(buf, src=0)
