"""``sharding: blocks``: every worker holds the whole model.

Base training: DDP replicas (the runtime's ``replicate``); rank 0 writes the candidates and
the checkpoints, with full tensors, and keeps the EMA of the weights.

TWA: each rank owns whole blocks (``core.blocks.plan_shards``, balanced by packed bytes): it
reads its blocks' columns of the candidates, builds its packed Q shard, and its steps
exchange the gradient and the weights through the ``twa.exchange`` (``parallel.exchanges``;
one process: ``core.collectives.LocalCollectives``). The center (w(X) of a finished round)
is a full (D,) vector in rank 0's state file.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ...config import TWAConfig
from ...core import TWA
from ...core.blocks import make_blocks, plan_shards
from ...core.collectives import LocalCollectives
from ...core.projection import build_projection
from ...store import CandidateStore
from ..exchanges import make_exchange
from .mode import Load, Replicate, ShardingMode, ShardSetup, check_store_matches, initial_ema, make_twa

log = logging.getLogger(__name__)


class BlocksMode(ShardingMode):
    """Whole-model replicas; TWA's projection sharded by whole blocks."""

    name = "blocks"

    def wrap(self, model: nn.Module, world: int, device: torch.device) -> nn.Module:
        return model

    # ------------------------------------------------------------ base training

    def check_checkpoint(self, state: dict[str, Any], path: str) -> None:
        if "model" not in state:
            raise ValueError(f"checkpoint {path} holds sharded state (train.sharding: fsdp); train.sharding: blocks "
                             "cannot resume from it")

    def wrap_for_training(self, net: nn.Module, world: int, device: torch.device, replicate: Replicate,
                          state: dict[str, Any] | None) -> tuple[nn.Module, nn.Module]:
        if state is not None:
            net.load_state_dict(state["model"])
        return net, replicate(net)  # DDP when world > 1; net stays the unwrapped module

    def load_training(self, net: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any] | None,
                      rank: int, load: Load | None) -> list[torch.Tensor] | None:
        if state is not None:
            optimizer.load_state_dict(state["optimizer"])
        return initial_ema(net, state) if rank == 0 else None

    def loss_scale(self, world: int, global_size: int) -> float:
        return world / global_size  # DDP averages the ranks' gradients

    def candidate_writer(self, writer: Any, store_uri: str, rank: int, world: int, device: torch.device) -> Any:
        return writer  # rank 0's writes whole candidates

    def training_checkpoint(self, net: nn.Module, optimizer: torch.optim.Optimizer,
                            ema: list[torch.Tensor] | None, rank: int) -> tuple[dict | None, dict | None]:
        if rank != 0:
            return None, None
        return {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                "ema": torch.cat([e.reshape(-1) for e in ema]).cpu()}, None

    # ------------------------------------------------------------ TWA

    def check_workers(self, workers: int, num_blocks: int, granularity: str) -> None:
        if workers > num_blocks:
            raise ValueError(
                f"twa.workers={workers} is more than the {num_blocks} block(s) of granularity {granularity!r}: each "
                "worker owns whole blocks; use a finer granularity or fewer workers"
            )

    def build_twa(self, model: nn.Module, store: CandidateStore, candidate_indices: list[int], cfg: TWAConfig,
                  total_steps: int, rank: int = 0, world_size: int = 1,
                  center: torch.Tensor | None = None) -> ShardSetup:
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
            comm, exchange = LocalCollectives(layout.num_params), None
        else:
            comm = make_exchange(cfg.exchange, plan.ranges, rank, world_size, backend=dist.get_backend())
            exchange = comm.name
        w = store.read(columns=list(range(t0, t1)), candidates=candidate_indices).to(device)  # (n, end - start)
        proj = build_projection(
            w, blocks.sizes[l0:l1], cfg.basis, cfg.bits, all_reduce=comm.all_reduce_sum,
            max_chunk_bytes=cfg.max_chunk_bytes, center=None if center is None else center[start:end],
            start=cfg.start, kernel=cfg.kernel,
        )
        del w
        twa = make_twa(model, proj, len(blocks), (l0, l1), cfg, comm, total_steps)
        log.debug("rank %d: blocks %d-%d, %d coordinates, %d projection bytes, exchange %s", rank, l0, l1,
                  end - start, proj.nbytes, exchange or "local")
        return ShardSetup(twa, blocks, plan, list(candidate_indices), exchange)

    def round_center(self, model: nn.Module, twa: TWA) -> torch.Tensor:
        return twa.weights().detach().cpu().clone()  # (D,)

    def state_center(self, center: torch.Tensor | None) -> torch.Tensor | None:
        return center

    def sharded_center(self, model: nn.Module, center: torch.Tensor | None) -> dict | None:
        return None

    def resume_center(self, model: nn.Module, center: torch.Tensor | None, rounds_done: int,
                      load: Load) -> torch.Tensor | None:
        return center  # the state file's

    def gather_result(self, model: nn.Module, center: torch.Tensor, rank: int, world: int) -> torch.Tensor | None:
        return center  # every rank holds it whole
