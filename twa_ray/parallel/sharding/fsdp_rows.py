"""TWA on an FSDP2-sharded model (``twa.sharding: fsdp``): the rows each rank owns.

The workers wrap the model with ``torch.distributed.fsdp.fully_shard``
(``fsdp_tensors.fsdp_wrap``): rank r keeps its part ``core.fsdp_rows.fsdp_shard(shape, r, k)`` of every
parameter (indices of dim 0, or of the first dim k divides when it does not divide dim 0;
"rows" below), and of its gradient. Its TWA shard is exactly those rows: it reads them from
the candidate store and builds its packed Q and center for them (``core.row_shards``:
per-block norms, Grams and quantisation ranges are all-reduced). One TWA step after
``loss.backward()``:

1. FSDP's reduce-scatter has left the summed gradient's local rows in ``p.grad`` (a DTensor);
2. G_r = Q[:, rows_r] g[rows_r] over all L blocks -> all-reduce (n x L numbers);
3. the same optimizer step on X on every rank;
4. w[rows_r] = c[rows_r] + Q[:, rows_r]^T X written into the local shards; FSDP all-gathers
   them for the next forward pass, so TWA adds no weight traffic of its own.

Per worker, model + gradient + projection are 1/k of the whole (plus FSDP's transient
all-gather of one unit). The wrapping (``fsdp_wrap``) is shared with base training. Bases:
``row_shards.ROW_BASES`` (not ``checkpoints``); every bit width and granularity.

Checkpoints (``fsdp.FSDPMode``, which the TWA loop calls): X, its optimizer and scheduler are
the same on every rank and the BatchNorm buffers are per rank but small, so rank 0 saves them
as in ``blocks`` mode. The one sharded state is the center (w(X) of the last finished round,
the next round's origin): each rank keeps only its rows (:func:`own_rows`) and saves them
with ``torch.distributed.checkpoint`` (:func:`center_shards`, one .distcp file per rank); a
resumed rank reads back just its rows. The final weights are gathered once, on rank 0, for the
result (:func:`gather_rows`).
"""
from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from ...config import TWAConfig, sharding_problems
from ...core.blocks import make_blocks
from ...core.fsdp_rows import fsdp_element_ranges, fsdp_shard
from ...core.params import ParamLayout, trainable_parameters
from ...core.row_shards import build_row_projection, row_block_sizes
from ...store import CandidateStore
from ..exchanges import Exchange
from .fsdp_tensors import gather_on_rank0, local_shard, sharded_by_name
from .mode import ShardSetup, check_store_matches, make_twa

log = logging.getLogger(__name__)


class RowLayout:
    """Where each rank's part of every tensor (``core.fsdp_rows.fsdp_shard``) sits in the flat parameter
    vector (D,), tensor by tensor.

    A rank's own vector is its part of tensor 0 flattened (``to_local().reshape(-1)``), then of
    tensor 1, ... (``numel(rank)`` values)."""

    def __init__(self, layout: ParamLayout, world: int) -> None:
        self.layout = layout
        self.world = world
        # parts[r][t]: rank r's part of tensor t
        self.parts = [[fsdp_shard(shape, r, world) for shape in layout.shapes] for r in range(world)]

    def numels(self, rank: int) -> list[int]:
        """Elements of each tensor ``rank`` holds."""
        return [part.numel for part in self.parts[rank]]

    def numel(self, rank: int) -> int:
        return sum(self.numels(rank))

    def _views(self, flat: torch.Tensor, rank: int) -> list[torch.Tensor]:
        """(..., D) -> per tensor t, ``rank``'s part of it: a view of shape (..., *local_shape_t)."""
        lead = flat.shape[:-1]
        return [flat[..., o : o + n].reshape(*lead, *part.shape).narrow(len(lead) + part.dim, part.start,
                                                                        part.end - part.start)
                for part, o, n in zip(self.parts[rank], self.layout.offsets, self.layout.numels)]

    def take(self, flat: torch.Tensor, rank: int) -> torch.Tensor:
        """(..., D) -> (..., numel(rank)): ``rank``'s part of every tensor."""
        lead = flat.shape[:-1]
        return torch.cat([v.reshape(*lead, -1) for v in self._views(flat, rank)], dim=-1)

    def put(self, own: torch.Tensor, rank: int, out: torch.Tensor) -> None:
        """Inverse of ``take``: write ``rank``'s values (the first numel(rank) of ``own``) into ``out`` (D,)."""
        for view, part in zip(self._views(out, rank), own[: self.numel(rank)].split(self.numels(rank))):
            view.copy_(part.view(view.shape))


class FSDPShard:
    """A ``core.twa.ParamShard`` over the local shards FSDP2 keeps: this rank's part
    (``RowLayout``) of every trainable parameter, in layout order."""

    def __init__(self, model: nn.Module, rows: RowLayout, rank: int, device) -> None:
        self.model = model
        self.rows = rows
        self.rank = rank
        self.numels = rows.numels(rank)
        self.numel = sum(self.numels)
        local = [local_shard(p).numel() for p in trainable_parameters(model)]
        if local != self.numels:
            raise ValueError(f"rank {rank}: FSDP's local shards hold {local} elements, the row layout says "
                             f"{self.numels} (is the model wrapped with fully_shard on a 1-D mesh of "
                             f"{rows.world} ranks?)")
        self._grad = torch.empty(self.numel, device=device)

    def gradient(self) -> torch.Tensor:
        for p, dst in zip(trainable_parameters(self.model), self._grad.split(self.numels)):
            if p.grad is None:
                dst.zero_()
            else:
                dst.copy_(local_shard(p.grad).reshape(-1))
        return self._grad

    @torch.no_grad()
    def write(self, own: torch.Tensor) -> None:
        for p, part in zip(trainable_parameters(self.model), own.split(self.numels)):
            local = local_shard(p)
            local.copy_(part.view_as(local))

    @torch.no_grad()
    def gather(self, own: torch.Tensor) -> torch.Tensor:
        """(D,) from every rank's rows: one all-gather (at the end of a round, not per step)."""
        out = torch.empty(self.rows.layout.num_params, device=own.device)
        world = self.rows.world
        if world == 1:
            self.rows.put(own, 0, out)
            return out
        pad = max(self.rows.numel(r) for r in range(world))
        src = torch.zeros(pad, device=own.device)
        src[: own.numel()] = own
        gathered = torch.empty(world * pad, device=own.device)
        dist.all_gather_single(gathered, src)
        for r in range(world):
            self.rows.put(gathered[r * pad : (r + 1) * pad], r, out)
        return out


def own_rows(tensors) -> torch.Tensor:
    """(numel(rank),) this rank's local shards of ``tensors`` (a model's trainable parameters
    in layout order, or :func:`center_shards`' values) as one vector (a copy, on their device)."""
    return torch.cat([local_shard(t).detach().reshape(-1) for t in tensors])


def center_shards(model: nn.Module, own: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """This rank's rows ``own`` (numel(rank),) of a (D,) vector as {parameter name: DTensor},
    each laid out like its (FSDP2-sharded) parameter: what DCP saves. Without ``own``: empty
    ones on the parameters' devices, for DCP to load into (then :func:`own_rows` of them)."""
    local = [local_shard(p) for p in trainable_parameters(model)]
    if own is None:
        return sharded_by_name(model, [torch.empty_like(t) for t in local])
    if own.numel() != sum(t.numel() for t in local):
        raise ValueError(f"{own.numel()} values for local shards of {sum(t.numel() for t in local)}")
    parts = own.to(local[0].device).split([t.numel() for t in local])
    return sharded_by_name(model, [part.reshape(t.shape).clone() for part, t in zip(parts, local)])


def gather_rows(model: nn.Module, own: torch.Tensor, rank: int, world: int) -> torch.Tensor | None:
    """The (D,) vector of which every rank holds its rows ``own`` (numel(rank),) of the FSDP2
    ``model``, on rank 0 only: float32 on CPU there, None on the other ranks (a collective:
    ``fsdp_tensors.gather_on_rank0``, so no other rank holds the full vector)."""
    rows = RowLayout(ParamLayout.from_model(model), world)
    return gather_on_rank0(own.split(rows.numels(rank)), rows.layout.shapes, rank, world)


class RowCollectives(Exchange):
    """TWA's collectives under FSDP: the all-reduces (sum, max). Rank r's coordinates are
    [sum of numel(<r), sum of numel(<=r)) of the rank-major order; TWA never reduce-scatters
    or all-gathers them: FSDP does, in the forward and backward passes (``FSDPShard``)."""

    name = "fsdp"

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t


def build_fsdp_twa(
    model: nn.Module,
    store: CandidateStore,
    candidate_indices: list[int],
    cfg: TWAConfig,
    total_steps: int,
    rank: int = 0,
    world_size: int = 1,
    center: torch.Tensor | None = None,
) -> ShardSetup:
    """TWA for this rank of an FSDP2 model (``fsdp_wrap``): its rows of the chosen candidates
    -> its packed Q rows. ``center`` (numel(rank),): this rank's rows (:func:`own_rows`) of the
    origin (X = 0) when given (a later round)."""
    problems = sharding_problems(cfg)
    if problems:
        raise ValueError("twa.sharding: " + "; ".join(problems))
    layout = check_store_matches(store, model)
    rows = RowLayout(layout, world_size)
    device = local_shard(next(model.parameters())).device
    shard = FSDPShard(model, rows, rank, device)
    if center is not None and center.numel() != shard.numel:
        raise ValueError(f"rank {rank}: a center of {center.numel()} values for its {shard.numel} rows")
    blocks = make_blocks(layout.numels, cfg.granularity)
    sizes = row_block_sizes(blocks, shard.numels)
    ends = torch.tensor([rows.numel(r) for r in range(world_size)]).cumsum(0).tolist()
    comm = RowCollectives(list(zip([0] + ends[:-1], ends)), rank, world_size)
    own = fsdp_element_ranges(store.shapes, rank, world_size)  # per tensor the rank's element ranges
    w = store.read_ranges(own, candidate_indices).to(device)  # (n, numel(rank)): only these rows
    proj = build_row_projection(
        w, sizes, cfg.basis, cfg.bits, comm.all_reduce_sum, comm.all_reduce_max,
        center=None if center is None else center.to(device), max_chunk_bytes=cfg.max_chunk_bytes,
        kernel=cfg.kernel,
    )
    del w
    twa = make_twa(model, proj, len(blocks), (0, len(blocks)), cfg, comm, total_steps, shard=shard)
    log.debug("rank %d: %d of %d coordinates, %d projection bytes", rank, shard.numel, layout.num_params, proj.nbytes)
    return ShardSetup(twa, blocks, None, list(candidate_indices))
