"""The contract of a sharding mode: how the workers of a stage share the model, its TWA and
their checkpoints (``train.sharding``, ``twa.sharding``). One subclass per mode
(``blocks.BlocksMode``, ``fsdp.FSDPMode``), chosen once by name (``sharding_mode``); the Ray
Train loops of base training and TWA call the mode's object and never ask which mode it is.

No Ray here: what a mode needs of Ray (DDP through Ray's ``prepare_model``, reading a Ray
checkpoint's shards) reaches it as arguments: ``replicate`` and ``load``.

- ``replicate(net) -> model``: wraps a module for data-parallel training (DDP on 2+ ranks).
- ``load(sharded) -> None``: fills ``sharded`` (nested dicts of tensors; DTensors: this rank's
  shards) in place from the checkpoint being resumed (``runtime.checkpoint_reads.load_shards``;
  ``functools.partial(parallel.checkpoint_files.load_sharded, folder)`` for a local folder).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ...config import TWAConfig
from ...core import TWA, ScheduleSpec
from ...core.blocks import Blocks, ShardPlan
from ...core.params import ParamLayout, trainable_parameters
from ...store import CandidateStore, parameter_mismatch
from .fsdp_tensors import local_shard

log = logging.getLogger(__name__)

Load = Callable[[dict[str, Any]], None]  # fills a sharded state in place from the checkpoint being resumed
Replicate = Callable[[nn.Module], nn.Module]  # a module -> its data-parallel wrapper (DDP)


@dataclass
class ShardSetup:
    """One rank's TWA of one round, as a mode builds it (:meth:`ShardingMode.build_twa`)."""

    twa: TWA
    blocks: Blocks
    plan: ShardPlan | None  # None under twa.sharding: fsdp (rows of every tensor, not whole blocks)
    candidate_indices: list[int]
    exchange: str | None = None  # the twa.exchange the step uses (blocks on 2+ ranks), else None


class ShardingMode:
    """How k workers share a model (``name``: the ``sharding`` value). Stateless: one object
    serves a whole run. Every method that says "a collective" is called by every rank at the
    same point."""

    name: ClassVar[str]
    lockstep: ClassVar[bool] = False  # evaluation: every rank makes as many forward passes

    # ------------------------------------------------------------ both stages

    def wrap(self, model: nn.Module, world: int, device: torch.device) -> nn.Module:
        """``model`` (on ``device``) as TWA's workers hold it."""
        raise NotImplementedError

    # ------------------------------------------------------------ base training

    def check_checkpoint(self, state: dict[str, Any], path: str) -> None:
        """Raise ValueError when the base-training checkpoint at ``path`` (its rank-0 ``state``)
        was made by another mode."""
        raise NotImplementedError

    def wrap_for_training(self, net: nn.Module, world: int, device: torch.device, replicate: Replicate,
                          state: dict[str, Any] | None) -> tuple[nn.Module, nn.Module]:
        """(net, model) of base training: ``net`` the module whose parameters the optimizer,
        the candidates and the checkpoints see, ``model`` the one to call forward. ``state``:
        the checkpoint being resumed (rank 0's state file), or None."""
        raise NotImplementedError

    def load_training(self, net: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any] | None,
                      rank: int, load: Load | None) -> list[torch.Tensor] | None:
        """Load the resumed checkpoint's optimizer state (and what ``wrap_for_training`` did not
        load) and return the EMA of the weights this rank keeps (per trainable parameter, its
        local part; None on a rank that keeps none). A collective."""
        raise NotImplementedError

    def before_forward(self, net: nn.Module) -> None:
        """Called before every forward pass of base training (a collective)."""

    def loss_scale(self, world: int, global_size: int) -> float:
        """The factor of a rank's summed loss over its part of a global batch of ``global_size``
        examples that makes the gradient the global batch's mean loss's."""
        raise NotImplementedError

    def candidate_writer(self, writer: Any, store_uri: str, rank: int, world: int, device: torch.device) -> Any:
        """This rank's candidate writer, given rank 0's ``candidates.CandidateWriter`` (None on
        the other ranks); None on a rank that writes nothing. A collective."""
        raise NotImplementedError

    def training_checkpoint(self, net: nn.Module, optimizer: torch.optim.Optimizer,
                            ema: list[torch.Tensor] | None, rank: int) -> tuple[dict | None, dict | None]:
        """(the state file's content on rank 0, None on the others; this rank's sharded state
        for DCP, or None on every rank). A collective."""
        raise NotImplementedError

    # ------------------------------------------------------------ TWA

    def check_workers(self, workers: int, num_blocks: int, granularity: str) -> None:
        """Raise ValueError when ``workers`` cannot share the ``num_blocks`` blocks of ``granularity``."""

    def build_twa(self, model: nn.Module, store: CandidateStore, candidate_indices: list[int], cfg: TWAConfig,
                  total_steps: int, rank: int = 0, world_size: int = 1,
                  center: torch.Tensor | None = None) -> ShardSetup:
        """This rank's TWA of ``candidate_indices`` for the ``model`` that :meth:`wrap` made;
        ``center``: the origin (X = 0) as :meth:`round_center` keeps it (blocks (D,), fsdp this
        rank's rows (numel(rank),); a later round), else the candidates' mean. A collective."""
        raise NotImplementedError

    def round_center(self, model: nn.Module, twa: TWA) -> torch.Tensor:
        """The end of a round: w(X), the next round's origin, as this rank keeps it (a copy):
        blocks (D,) on CPU, fsdp this rank's rows (numel(rank),) on its device."""
        raise NotImplementedError

    def state_center(self, center: torch.Tensor | None) -> torch.Tensor | None:
        """What of ``center`` goes into rank 0's state file."""
        raise NotImplementedError

    def sharded_center(self, model: nn.Module, center: torch.Tensor | None) -> dict | None:
        """This rank's sharded state holding ``center`` (None: nothing sharded)."""
        raise NotImplementedError

    def resume_center(self, model: nn.Module, center: torch.Tensor | None, rounds_done: int,
                      load: Load) -> torch.Tensor | None:
        """The center of a resumed run, given the state file's ``center`` and the number of
        finished rounds. A collective."""
        raise NotImplementedError

    def gather_result(self, model: nn.Module, center: torch.Tensor, rank: int, world: int) -> torch.Tensor | None:
        """The final weights (D,), float32 on CPU, from every rank's ``center``, on rank 0 (None
        on the others where they are not whole). A collective."""
        raise NotImplementedError


def check_store_matches(store: CandidateStore, model: nn.Module) -> ParamLayout:
    """The model's parameter layout; raises ValueError naming the store and parameter on mismatch."""
    layout = ParamLayout.from_model(model)
    problem = parameter_mismatch(store.names, store.shapes, layout.names, layout.shapes, "store", "model")
    if problem:
        raise ValueError(f"candidate store {store.uri}: {problem}")
    return layout


def make_twa(model: nn.Module, projection: Any, num_blocks: int, block_range: tuple[int, int], cfg: TWAConfig,
             collectives: Any, total_steps: int, shard: Any = None) -> TWA:
    """A rank's TWA over its ``projection`` (blocks ``block_range`` of ``num_blocks``), with
    ``cfg``'s optimizer and a schedule over ``total_steps`` steps: what every mode builds."""
    return TWA(
        model, projection, num_blocks, block_range,
        optimizer=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov, grad_clip=cfg.grad_clip, collectives=collectives, shard=shard,
        schedule=ScheduleSpec(kind=cfg.schedule, total_steps=max(1, total_steps), warmup_frac=cfg.warmup,
                              epochs=cfg.epochs),
    )


def initial_ema(net: nn.Module, state: dict[str, Any] | None) -> list[torch.Tensor]:
    """The EMA of each trainable parameter of ``net`` (with FSDP its local part): a ``blocks``
    checkpoint's, or a copy of the weights (the first update overwrites it: its decay is 0)."""
    params = trainable_parameters(net)
    if state is not None and state.get("ema") is not None:
        flat = state["ema"]
        return [v.view(p.shape).to(p.device, copy=True)
                for v, p in zip(flat.split([p.numel() for p in params]), params)]
    if state is not None:
        log.warning("the checkpoint holds no EMA of the weights (made by an older version): the EMA restarts "
                    "from its weights")
    return [local_shard(p).detach().clone() for p in params]
