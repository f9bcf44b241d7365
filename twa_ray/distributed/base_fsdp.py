"""Base training on an FSDP2-sharded model (``train.sharding: fsdp``).

The workers wrap the model with ``distributed.fsdp.fsdp_wrap`` (``fully_shard``: rank r
holds rows ``store.fsdp_row_range(shape, r, k)`` of dim 0 of every parameter, of its
gradient and of its optimizer state) and train it as the ``blocks`` (DDP) mode does, with
the same batches, optimizer and schedule; ``base_train`` holds the loop, this module what
differs:

- gradients: FSDP reduce-scatters their sum where DDP averages, so a rank's loss is
  scaled by ``loss_scale``: either way the gradient of the global batch's mean loss;
- buffers (BatchNorm's running statistics) are not sharded: every rank keeps a copy and
  rank 0's is broadcast before every forward pass (``fsdp.broadcast_buffers``), as DDP
  does, so they evolve as in ``blocks`` mode;
- the EMA of the weights: each rank keeps that of its rows;
- candidates (:class:`RowCandidateWriter`): every rank writes its rows of every parameter
  into one pending candidate file at the same time (``CandidateStore.begin_candidate`` on
  rank 0, ``write_rows`` on every rank); after an all-reduce, which also tells every rank
  whether all rows were written, rank 0 commits it under the next index. No reader sees a
  pending file, and the committed one holds the full vector a ``blocks`` run would write.
  Each checkpoint's info records the bytes every rank has written (``candidate_bytes_written``,
  by rank, since the worker group started). An object store cannot write into a file: there
  rank 0 gathers the weights and appends;
- checkpoints (:func:`gathered_state`) hold full tensors, ``blocks`` mode's format: rank 0
  gathers the model, the optimizer state and the EMA. A resumed run loads the model before
  sharding it, then shards the optimizer state (:func:`sharded_optimizer_state`) and the
  EMA by rows, so it continues exactly.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from ..core.params import trainable_parameters
from ..store import CandidateStore
from .fsdp import full_like, gather_full, local_shard, shard_like
from .worker import all_reduce_sum

if TYPE_CHECKING:
    from .base_train import _CandidateWriter

log = logging.getLogger(__name__)

_GATHER = "gather"  # RowCandidateWriter's broadcast: the store cannot be written in pieces


def loss_scale(sharding: str, world: int, global_size: int) -> float:
    """The factor of a rank's summed loss over its part of a global batch of ``global_size``
    examples that makes the gradient the global batch's mean loss's: DDP (``blocks``)
    averages the ranks' gradients, FSDP (``fsdp_wrap``) sums them."""
    return (world if sharding == "blocks" else 1) / global_size


def _broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a collective; ``obj`` itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class RowCandidateWriter:
    """Every rank's part in saving candidates of an FSDP2 model: each writes its rows.

    ``save`` is base training's candidate writer's, called by every rank at the same point
    (a collective); rank 0's ``_CandidateWriter`` decides what is saved and with what info.
    """

    def __init__(self, writer: "_CandidateWriter | None", store_uri: str, rank: int, world: int,
                 device: torch.device) -> None:
        self.writer = writer  # rank 0's; None on the others
        self.store = writer.store if writer is not None else CandidateStore.open(store_uri)
        self.rank, self.world, self.device = rank, world, device

    @torch.no_grad()
    def save(self, net: nn.Module, *, kind: str, step: int, lr: float, metrics: dict) -> None:
        info = self.writer.info_for(kind=kind, step=step, lr=lr, metrics=metrics) if self.writer is not None else None
        pending = None
        if info is not None:
            pending = self.store.begin_candidate(info) if self.store.is_local else _GATHER
        pending = _broadcast(pending)
        if pending is None:  # nothing due at this step
            return
        params = trainable_parameters(net)
        if pending == _GATHER:
            full = gather_full([p.detach() for p in params])
            if self.writer is not None:
                self.writer.saved(self.store.append(full, info), info)
            return
        failed = 0.0
        try:
            own = torch.cat([local_shard(p).detach().reshape(-1) for p in params])  # this rank's rows, store order
            self.store.write_rows(pending, self.store.fsdp_ranges(self.rank, self.world), own)
        except (ValueError, OSError) as exc:
            log.error("rank %d could not write its rows of the candidate at step %d: %s", self.rank, step, exc)
            failed = 1.0
        failed = int(all_reduce_sum(torch.tensor([failed], dtype=torch.float64), self.device)[0])  # a barrier too
        if self.writer is not None:
            if failed:
                self.store.discard_candidate(pending)
            else:
                self.writer.saved(self.store.commit_candidate(pending), info)
        if failed:
            raise RuntimeError(f"the candidate at step {step} was not saved: {failed} of {self.world} ranks could "
                               "not write their rows (their errors are logged)")

    def bytes_by_rank(self) -> list[int]:
        """Bytes each rank has written into the store so far, indexed by rank (a collective)."""
        counts = torch.zeros(self.world, dtype=torch.float64)
        counts[self.rank] = self.store.bytes_written
        return [int(c) for c in all_reduce_sum(counts, self.device).tolist()]


@torch.no_grad()
def gathered_state(net: nn.Module, optimizer: torch.optim.Optimizer, ema: list[torch.Tensor], rank: int
                   ) -> dict[str, Any] | None:
    """Rank 0's checkpoint state of an FSDP2 model, with full tensors as in ``blocks`` mode:
    model, optimizer and ``ema`` (each rank's local rows of every trainable parameter) as
    one (D,) vector. None on the other ranks. A collective."""
    state = {
        "model": gather_full(net.state_dict()),
        "optimizer": gather_full(optimizer.state_dict()),
        "ema": torch.cat([full_like(e, p).reshape(-1) for e, p in zip(ema, trainable_parameters(net))]).cpu(),
    }
    return state if rank == 0 else None


def sharded_optimizer_state(state: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A full optimizer state dict (:func:`gathered_state`) for ``optimizer`` over FSDP2
    parameters: every tensor of a parameter's shape becomes this rank's rows of it."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    per_param = {
        i: {k: shard_like(v, params[i]) if torch.is_tensor(v) and v.shape == params[i].shape else v
            for k, v in s.items()}
        for i, s in state["state"].items()
    }
    return {**state, "state": per_param}
