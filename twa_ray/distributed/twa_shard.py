"""One worker's part of sharded TWA: read its columns, build its packed Q shard, wrap TWA.

No Ray here: rank and world size are arguments, and the collectives come from
torch.distributed when world_size > 1 (the process group Ray Train sets up).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..config import TWAConfig
from ..core import TWA, ScheduleSpec
from ..core.blocks import Blocks, ShardPlan, make_blocks, plan_shards
from ..core.params import ParamLayout
from ..core.projection import build_projection
from ..core.collectives import LocalCollectives
from ..store import CandidateStore, parameter_mismatch
from .collectives import TorchCollectives, resolve_exchange

log = logging.getLogger(__name__)


@dataclass
class ShardSetup:
    twa: TWA
    blocks: Blocks
    plan: ShardPlan | None  # None under twa.sharding: fsdp (rows of every tensor, not whole blocks)
    candidate_indices: list[int]


def check_store_matches(store: CandidateStore, model: nn.Module) -> ParamLayout:
    """The model's parameter layout; raises ValueError naming the store and parameter on mismatch."""
    layout = ParamLayout.from_model(model)
    problem = parameter_mismatch(store.names, store.shapes, layout.names, layout.shapes, "store", "model")
    if problem:
        raise ValueError(f"candidate store {store.uri}: {problem}")
    return layout


def build_shard_twa(
    model: nn.Module,
    store: CandidateStore,
    candidate_indices: list[int],
    cfg: TWAConfig,
    total_steps: int,
    rank: int = 0,
    world_size: int = 1,
    center: torch.Tensor | None = None,
) -> ShardSetup:
    """TWA for this rank: its blocks' columns of the chosen candidates -> packed Q shard.

    ``center`` (D,) is the origin (X = 0) when given (a later round starts from the
    previous solution), else the candidates' mean. ``model`` sits on the device to use.
    """
    layout = check_store_matches(store, model)
    blocks = make_blocks(layout.numels, cfg.granularity)
    plan = plan_shards(blocks, cfg.bits, world_size)
    t0, t1 = plan.tensor_runs[rank]
    l0, l1 = plan.block_runs[rank]
    start, end = plan.ranges[rank]
    device = next(model.parameters()).device
    if world_size == 1:
        comm = LocalCollectives(layout.num_params)
    else:
        exchange = resolve_exchange(cfg.exchange, dist.get_backend())
        comm = TorchCollectives(plan.ranges, rank, world_size, exchange=exchange)
    w = store.read(columns=list(range(t0, t1)), candidates=candidate_indices).to(device)  # (n, end - start)
    proj = build_projection(
        w, blocks.sizes[l0:l1], cfg.basis, cfg.bits, all_reduce=comm.all_reduce_sum,
        max_chunk_bytes=cfg.max_chunk_bytes, center=None if center is None else center[start:end], start=cfg.start,
        kernel=cfg.kernel,
    )
    del w
    twa = TWA(
        model, proj, len(blocks), (l0, l1),
        optimizer=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov, grad_clip=cfg.grad_clip, collectives=comm,
        schedule=ScheduleSpec(kind=cfg.schedule, total_steps=max(1, total_steps), warmup_frac=cfg.warmup,
                              epochs=cfg.epochs),
    )
    log.debug("rank %d: blocks %d-%d, %d coordinates, %d projection bytes, exchange %s", rank, l0, l1, end - start,
              proj.nbytes, getattr(comm, "exchange", "local"))
    return ShardSetup(twa, blocks, plan, list(candidate_indices))


def candidate_rounds(indices: list[int], per_round: int | None) -> list[list[int]]:
    """Split the chosen candidates into rounds of at most ``per_round`` (None: one round).

    Round t > 0 is centred on round t-1's solution, so even a round of a single
    candidate spans a line.
    """
    if per_round is None or per_round >= len(indices):
        return [list(indices)]
    return [indices[i : i + per_round] for i in range(0, len(indices), per_round)]
