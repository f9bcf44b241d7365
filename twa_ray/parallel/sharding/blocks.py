"""``sharding: blocks``: every worker holds the whole model.

Base training: DDP replicas (the runtime's ``replicate``); rank 0 writes the candidates and
the checkpoints, with full tensors, and keeps the EMA of the weights.

TWA: each rank owns a balanced contiguous range of the flat parameter vector
(``core.blocks.plan_ranges``: [r*D//k, (r+1)*D//k), cut through blocks and tensors): it reads
just that range of the candidates (``store.read_ranges``), builds its packed Q shard with the
per-block norms, Grams and quantisation ranges of cut blocks reduced across ranks
(``core.row_shards.build_row_projection``, as under FSDP), and its steps
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
from ...core.blocks import make_blocks, plan_ranges
from ...core.collectives import LocalCollectives
from ...core.projection import build_projection
from ...core.row_shards import build_row_projection
from ...store import CandidateStore
from ..exchanges import make_exchange
from .mode import Load, Replicate, ShardingMode, ShardSetup, check_store_matches, initial_ema, make_twa

log = logging.getLogger(__name__)


def _all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Elementwise maximum over the ranks of the default group, in place."""
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


class BlocksMode(ShardingMode):
    """Whole-model replicas; TWA's projection sharded by balanced ranges of the flat vector."""

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
        pass  # ranges cut through blocks: any number of workers up to D shares them

    def build_twa(self, model: nn.Module, store: CandidateStore, candidate_indices: list[int], cfg: TWAConfig,
                  total_steps: int, rank: int = 0, world_size: int = 1,
                  center: torch.Tensor | None = None) -> ShardSetup:
        """TWA for this rank: its range of the chosen candidates -> packed Q shard.

        ``center`` (D,) is the origin (X = 0) when given (a later round starts from the
        previous solution), else the candidates' mean. ``model`` sits on the device to use.
        """
        layout = check_store_matches(store, model)
        blocks = make_blocks(layout.numels, cfg.granularity)
        plan = plan_ranges(blocks, cfg.bits, world_size)
        l0, l1 = plan.block_runs[rank]
        start, end = plan.ranges[rank]
        device = next(model.parameters()).device
        if world_size == 1:
            comm, exchange = LocalCollectives(layout.num_params), None
        else:
            comm = make_exchange(cfg.exchange, plan.ranges, rank, world_size, backend=dist.get_backend())
            exchange = comm.name
        # (n, end - start): this rank's range of every candidate, nothing else
        w = store.read_ranges(plan.tensor_element_ranges(blocks, rank), candidates=candidate_indices).to(device)
        own_center = None if center is None else center[start:end]
        if world_size == 1:
            proj = build_projection(w, blocks.sizes, cfg.basis, cfg.bits, max_chunk_bytes=cfg.max_chunk_bytes,
                                    center=own_center, start=cfg.start, kernel=cfg.kernel)
        else:
            sizes = [0] * len(blocks)
            sizes[l0:l1] = plan.parts[rank]
            leads = [False] * len(blocks)
            leads[l0:l1] = plan.leads(blocks, rank)
            proj = build_row_projection(
                w, sizes, cfg.basis, cfg.bits, comm.all_reduce_sum, _all_reduce_max, center=own_center,
                max_chunk_bytes=cfg.max_chunk_bytes, kernel=cfg.kernel, block_range=(l0, l1), start=cfg.start,
                leads=leads,
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
