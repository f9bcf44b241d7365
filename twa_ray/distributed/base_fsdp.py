"""Base training on an FSDP2-sharded model (``train.sharding: fsdp``).

The workers wrap the model with ``distributed.fsdp.fsdp_wrap`` (``fully_shard``: rank r
holds its part ``store.fsdp_shard(shape, r, k)`` of every parameter (its "rows": indices of
dim 0, or of a dim k divides), of its gradient and of its optimizer state) and train it as
the ``blocks`` (DDP) mode does, with the same batches, optimizer and schedule; ``base_train``
holds the loop, this module what differs:

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
  by rank, since the worker group started). Before the commit each rank reads back the next
  rank's rows and compares them with the checksum that rank computed of what it wrote
  (``store.rows.rows_checksum``): a path every node sees may be a filesystem that keeps one
  writer's copy of a file (a FUSE mount of an object store, such as gcsfuse or s3fs, uploads the
  whole file on close: the last to close wins, the others' rows stay zeros). Then that candidate,
  and every later one, is gathered on rank 0 and appended whole, with one warning. An object
  store cannot write into a file at all: there rank 0 gathers the weights (no other rank holds
  them: ``fsdp.gather_on_rank0``) and appends;
- checkpoints hold sharded state (``torch.distributed.checkpoint``, :func:`checkpoint_shards`):
  every rank saves its shards of the model, of the optimizer state and of the EMA into its
  own folder and reports it, and Ray Train merges the folders into one checkpoint
  (``checkpoints.ray_checkpoint``); rank 0's also holds the optimizer's hyper-parameters, the
  scheduler and the JSON info. A resumed rank loads just its shards into the sharded model
  and optimizer (:func:`load_checkpoint_shards`), so no rank ever holds the full model, and
  continues exactly; another number of workers reshards (DCP). ``base_train.read_final``
  assembles the full weights and EMA in one process.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from ..core.params import trainable_parameters
from ..store import CandidateStore
from ..store.rows import rows_checksum
from .checkpoint_reads import load_shards
from .fsdp import broadcast_buffers, gather_on_rank0, local_shard, sharded_by_name
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
    ``in_pieces``: whether candidates are written in pieces (a local or network filesystem
    whose shared files keep every rank's rows so far), else gathered on rank 0 and appended.
    """

    def __init__(self, writer: "_CandidateWriter | None", store_uri: str, rank: int, world: int,
                 device: torch.device) -> None:
        self.writer = writer  # rank 0's; None on the others
        self.store = writer.store if writer is not None else CandidateStore.open(store_uri)
        self.rank, self.world, self.device = rank, world, device
        self.in_pieces = self.store.is_local

    @torch.no_grad()
    def save(self, net: nn.Module, *, kind: str, step: int, lr: float, metrics: dict) -> None:
        info = self.writer.info_for(kind=kind, step=step, lr=lr, metrics=metrics) if self.writer is not None else None
        pending = None
        if info is not None:
            pending = self.store.begin_candidate(info) if self.in_pieces else _GATHER
        pending = _broadcast(pending)
        if pending is None:  # nothing due at this step
            return
        params = trainable_parameters(net)
        if pending != _GATHER and self._write_rows(pending, params, step):
            if self.writer is not None:
                self.writer.saved(self.store.commit_candidate(pending), info)
            return
        full = gather_on_rank0([local_shard(p) for p in params], [p.shape for p in params], self.rank, self.world)
        if self.writer is not None:  # rank 0: (D,) on CPU
            self.writer.saved(self.store.append_flat(full, info), info)

    def _write_rows(self, pending: str, params: list[nn.Parameter], step: int) -> bool:
        """Every rank writes its rows into the candidate file ``pending``, then reads back the
        next rank's rows and compares them with that rank's checksum (a collective). True when
        every rank's rows arrived. False when some did not: ``pending`` is discarded, rank 0
        warns, and the writer gathers candidates from now on (``in_pieces`` off on every rank).

        Raises:
            RuntimeError: a rank could not write its rows (``pending`` is discarded).
        """
        sums = torch.zeros(1 + self.world, dtype=torch.float64)  # ranks that failed, then each rank's checksum
        try:
            own = torch.cat([local_shard(p).detach().reshape(-1) for p in params])  # this rank's rows, store order
            self.store.write_rows(pending, self.store.fsdp_ranges(self.rank, self.world), own)
            sums[1 + self.rank] = rows_checksum(own)
        except (ValueError, OSError) as exc:
            log.error("rank %d could not write its rows of the candidate at step %d: %s", self.rank, step, exc)
            sums[0] = 1.0
        sums = all_reduce_sum(sums, self.device)  # a barrier too: every rank has written and closed the file
        failed = int(sums[0])
        if failed:
            if self.writer is not None:
                self.store.discard_candidate(pending)
            raise RuntimeError(f"the candidate at step {step} was not saved: {failed} of {self.world} ranks could "
                               "not write their rows (their errors are logged)")
        if self.world == 1:  # one writer: nothing to lose
            return True
        peer = (self.rank + 1) % self.world  # no rank checks its own rows: it may see its own copy of the file
        lost = torch.zeros(self.world, dtype=torch.float64)
        try:
            back = self.store.read_rows(pending, self.store.fsdp_ranges(peer, self.world))
            lost[peer] = float(rows_checksum(back) != int(sums[1 + peer]))
        except (ValueError, OSError) as exc:
            log.debug("rank %d could not read back rank %d's rows of %s: %s", self.rank, peer, pending, exc)
            lost[peer] = 1.0
        lost = all_reduce_sum(lost, self.device)
        if not lost.any():
            return True
        self.in_pieces = False
        if self.writer is not None:
            self.store.discard_candidate(pending)
            log.warning("candidate store %s: the rows of rank(s) %s of the candidate at step %d did not arrive in the "
                        "file that every rank wrote into: its filesystem, %s, does not support concurrent writers "
                        "to one file (a FUSE mount of an object store, such as gcsfuse or s3fs?). This candidate "
                        "and the next ones are gathered on rank 0 and written whole.", self.store.uri,
                        [r for r in range(self.world) if lost[r]], step, self.store.mount())
        return False

    def bytes_by_rank(self) -> list[int]:
        """Bytes each rank has written into the store so far, indexed by rank (a collective)."""
        counts = torch.zeros(self.world, dtype=torch.float64)
        counts[self.rank] = self.store.bytes_written
        return [int(c) for c in all_reduce_sum(counts, self.device).tolist()]


def checkpoint_shards(net: nn.Module, optimizer: torch.optim.Optimizer, ema: list[torch.Tensor]
                      ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """This rank's part of a checkpoint of an FSDP2 model (a collective): (its state for DCP,
    the optimizer's param groups). The DCP state is {"model": the model's state dict (DTensor
    parameters, rank 0's buffers), "optimizer": the optimizer state's tensors by parameter
    name, "ema": ``ema`` (this rank's local part of every trainable parameter) by name}. The
    param groups (hyper-parameters, the scheduler's current lr: the same on every rank) go
    into rank 0's state file."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    broadcast_buffers(net)  # rank 0's statistics everywhere: DCP saves one copy of a plain tensor, from any rank
    model_state, optim_state = get_state_dict(net, optimizer)
    sharded = {"model": model_state, "optimizer": _tensors_only(optim_state["state"]),
               "ema": sharded_by_name(net, ema)}
    return sharded, optim_state["param_groups"]


def load_checkpoint_shards(checkpoint: Any, net: nn.Module, optimizer: torch.optim.Optimizer,
                           param_groups: list[dict[str, Any]]) -> list[torch.Tensor]:
    """Load the ``checkpoint`` (a ``ray.train.Checkpoint`` or a local folder: :func:`checkpoint_shards`'
    state, saved by ``checkpoints.save_sharded``) into the FSDP2 ``net`` and its ``optimizer``
    (a collective): each rank reads only its shards (``checkpoint_reads.load_shards``: from a
    remote checkpoint just their bytes), from a checkpoint of any number of ranks.
    ``param_groups``: rank 0's state file's. Returns the EMA: this rank's local part of every
    trainable parameter."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    net.zero_grad(set_to_none=True)  # else get_state_dict does not create a fresh optimizer's state
    model_state, optim_state = get_state_dict(net, optimizer)  # the state to load into
    ema = [torch.empty_like(local_shard(p)) for p in trainable_parameters(net)]
    sharded = {"model": model_state, "optimizer": _tensors_only(optim_state["state"]),
               "ema": sharded_by_name(net, ema)}
    load_shards(checkpoint, sharded)
    set_state_dict(net, optimizer, model_state_dict=sharded["model"],
                   optim_state_dict={"state": sharded["optimizer"], "param_groups": param_groups})
    return [local_shard(e).clone() for e in sharded["ema"].values()]


def _tensors_only(optim_state: dict[str, dict[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors of a per-parameter optimizer state ({name: {key: value}}): DCP would pickle
    the rest (SGD's momentum_buffer None without momentum), and a missing key loads the same."""
    return {name: {k: v for k, v in per.items() if torch.is_tensor(v)} for name, per in optim_state.items()}
