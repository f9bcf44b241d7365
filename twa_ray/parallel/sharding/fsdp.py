"""``sharding: fsdp``: the workers shard the model with FSDP2 (``fsdp_tensors.fsdp_wrap``).

Rank r holds its part ``core.fsdp_rows.fsdp_shard(shape, r, k)`` of every parameter (its "rows":
indices of dim 0, or of a dim k divides), of its gradient and, in base training, of its
optimizer state and EMA. Against the ``blocks`` mode (DDP replicas):

- gradients: FSDP reduce-scatters their sum where DDP averages, so a rank's loss is scaled
  by :meth:`FSDPMode.loss_scale`: either way the gradient of the global batch's mean loss;
- buffers (BatchNorm's running statistics) are not sharded: every rank keeps a copy and
  rank 0's is broadcast before every forward pass (``fsdp_tensors.broadcast_buffers``), as
  DDP does, so they evolve as in ``blocks`` mode;
- evaluation runs in lockstep: the forward pass is a collective;
- candidates: every rank writes its rows (``fsdp_candidates.RowCandidateWriter``);
- base training's checkpoints hold sharded state (``torch.distributed.checkpoint``,
  :func:`checkpoint_shards`): every rank saves its shards of the model, of the optimizer
  state and of the EMA into its own folder and reports it, and Ray Train merges the folders
  into one checkpoint; rank 0's also holds the optimizer's hyper-parameters, the scheduler
  and the JSON info. A resumed rank loads just its shards into the sharded model and
  optimizer (:func:`load_checkpoint_shards`), so no rank ever holds the full model, and
  continues exactly; another number of workers reshards (DCP). ``runtime.base_train.read_final``
  assembles the full weights and EMA in one process;
- TWA: each rank's shard of the projection is its rows (``fsdp_rows``); the center is
  checkpointed as every rank's rows, and the result gathered on rank 0 only.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...config import TWAConfig
from ...core import TWA
from ...core.params import trainable_parameters
from ...store import CandidateStore
from ..process_group import barrier
from .fsdp_candidates import RowCandidateWriter
from .fsdp_rows import build_fsdp_twa, center_shards, gather_rows, own_rows
from .fsdp_tensors import broadcast_buffers, fsdp_wrap, local_shard, sharded_by_name
from .mode import Load, Replicate, ShardingMode, ShardSetup, initial_ema


class FSDPMode(ShardingMode):
    """FSDP2 row shards of the model, its gradient, optimizer state, EMA and TWA projection."""

    name = "fsdp"
    lockstep = True

    def wrap(self, model: nn.Module, world: int, device: torch.device) -> nn.Module:
        return fsdp_wrap(model, world, device)

    # ------------------------------------------------------------ base training

    def check_checkpoint(self, state: dict[str, Any], path: str) -> None:
        if "optimizer_groups" not in state:
            raise ValueError(f"checkpoint {path} holds full tensors (train.sharding: blocks, or an fsdp run of an "
                             "older version); train.sharding: fsdp resumes from sharded checkpoints only")

    def wrap_for_training(self, net: nn.Module, world: int, device: torch.device, replicate: Replicate,
                          state: dict[str, Any] | None) -> tuple[nn.Module, nn.Module]:
        net = self.wrap(net.to(device), world, device)  # a checkpoint's shards are loaded in load_training
        return net, net

    def load_training(self, net: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any] | None,
                      rank: int, load: Load | None) -> list[torch.Tensor] | None:
        if state is None:
            return initial_ema(net, None)
        # every rank reads its shards of model, optimizer and EMA (their bytes only)
        return load_checkpoint_shards(load, net, optimizer, state["optimizer_groups"])

    def before_forward(self, net: nn.Module) -> None:
        broadcast_buffers(net)  # rank 0's BatchNorm statistics, as DDP does

    def loss_scale(self, world: int, global_size: int) -> float:
        return 1 / global_size  # FSDP sums the ranks' gradients

    def candidate_writer(self, writer: Any, store_uri: str, rank: int, world: int, device: torch.device) -> Any:
        barrier(device)  # rank 0 has created the store
        return RowCandidateWriter(writer, store_uri, rank, world, device)

    def training_checkpoint(self, net: nn.Module, optimizer: torch.optim.Optimizer,
                            ema: list[torch.Tensor] | None, rank: int) -> tuple[dict | None, dict | None]:
        sharded, param_groups = checkpoint_shards(net, optimizer, ema)
        return ({"optimizer_groups": param_groups} if rank == 0 else None), sharded

    # ------------------------------------------------------------ TWA

    def build_twa(self, model: nn.Module, store: CandidateStore, candidate_indices: list[int], cfg: TWAConfig,
                  total_steps: int, rank: int = 0, world_size: int = 1,
                  center: torch.Tensor | None = None) -> ShardSetup:
        return build_fsdp_twa(model, store, candidate_indices, cfg, total_steps, rank, world_size, center)

    def round_center(self, model: nn.Module, twa: TWA) -> torch.Tensor:
        # the model's local shards hold this rank's rows of w(X), written by the last step
        return own_rows(trainable_parameters(model))

    def state_center(self, center: torch.Tensor | None) -> torch.Tensor | None:
        return None  # every rank's rows go into the checkpoint's sharded part (sharded_center)

    def sharded_center(self, model: nn.Module, center: torch.Tensor | None) -> dict | None:
        return None if center is None else {"center": center_shards(model, center)}

    def resume_center(self, model: nn.Module, center: torch.Tensor | None, rounds_done: int,
                      load: Load) -> torch.Tensor | None:
        if rounds_done == 0:
            return None  # no round has finished: no center saved
        sharded = {"center": center_shards(model)}  # this rank's rows of every rank's shards
        load(sharded)
        return own_rows(sharded["center"].values())

    def gather_result(self, model: nn.Module, center: torch.Tensor, rank: int, world: int) -> torch.Tensor | None:
        return gather_rows(model, center, rank, world)  # on rank 0 only, which writes it


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


def load_checkpoint_shards(load: Load, net: nn.Module, optimizer: torch.optim.Optimizer,
                           param_groups: list[dict[str, Any]]) -> list[torch.Tensor]:
    """Load a checkpoint of :func:`checkpoint_shards`' state (saved by
    ``checkpoint_files.save_sharded``) into the FSDP2 ``net`` and its ``optimizer`` (a
    collective): ``load`` fills this rank's shards (``runtime.checkpoint_reads.load_shards``:
    from a remote checkpoint just their bytes; ``checkpoint_files.load_sharded`` of a folder),
    from a checkpoint of any number of ranks. ``param_groups``: rank 0's state file's. Returns
    the EMA: this rank's local part of every trainable parameter."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    net.zero_grad(set_to_none=True)  # else get_state_dict does not create a fresh optimizer's state
    model_state, optim_state = get_state_dict(net, optimizer)  # the state to load into
    ema = [torch.empty_like(local_shard(p)) for p in trainable_parameters(net)]
    sharded = {"model": model_state, "optimizer": _tensors_only(optim_state["state"]),
               "ema": sharded_by_name(net, ema)}
    load(sharded)
    set_state_dict(net, optimizer, model_state_dict=sharded["model"],
                   optim_state_dict={"state": sharded["optimizer"], "param_groups": param_groups})
    return [local_shard(e).clone() for e in sharded["ema"].values()]


def _tensors_only(optim_state: dict[str, dict[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors of a per-parameter optimizer state ({name: {key: value}}): DCP would pickle
    the rest (SGD's momentum_buffer None without momentum), and a missing key loads the same."""
    return {name: {k: v for k, v in per.items() if torch.is_tensor(v)} for name, per in optim_state.items()}
