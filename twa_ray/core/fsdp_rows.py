"""FSDP2 shards: which part of each parameter tensor a rank holds, and where it lies in the flat tensor.

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards each parameter on one dim d, dim 0
unless ``shard_placement_fn`` returns ``Shard(d)``. The rule, from
``_FSDPParam._init_sharded_param`` (torch/distributed/fsdp/_fully_shard/_fsdp_param.py)::

    if d > 0 and param.size(d) % world != 0: raise NotImplementedError  # "uneven sharding on dim d"
    chunks = _chunk_with_empty(param, world, dim=d)    # torch.chunk, padded with empty chunks
    sharded_param = chunks[rank]
    padded_sharded_size = chunks[0].size()             # "0th always padded"

``torch.chunk(t, world, dim=d)`` cuts chunks of ``c = ceil(S / world)`` indices (S = the size
of dim d; the last one shorter) and returns fewer than ``world`` chunks when S indices do
not fill them, so rank r holds indices

    [min(S, r * c), min(S, (r + 1) * c))

of dim d (empty for the ranks past the last chunk, e.g. S = 5, world = 4: 2, 2, 1 and 0).
On dim d > 0 the chunks are even (S = c * world). Every rank *allocates* the padded size
``c x numel / S`` (its parameter storage, and the reduce-scatter output its gradient is a
view of), whatever its own part. A 0-d parameter has no dim to shard: FSDP2 rejects it,
and so does this module.

The placement this project asks of FSDP2 (:func:`fsdp_shard_dim`): dim 0 when world divides
it, else the first dim that world divides (no padding; a dim-0 cut of a tensor with few rows
pads it to ``world * ceil(S / world)`` rows, e.g. ViT's (1, 65, 192) position embedding:
8x at k = 8), else dim 0. The rank's part of a tensor of shape (*outer, S, *inner) cut on dim
d is then, in the flat (row-major) tensor, one run of ``(end - start) * prod(inner)`` elements
per outer index (:meth:`FsdpShard.ranges`; a single run for d = 0): the order of
``param.to_local().reshape(-1)``.

The candidate store knows only element ranges: a rank reads or writes its part of every
tensor with :func:`fsdp_element_ranges` (``CandidateStore.read_ranges`` / ``write_rows``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

__all__ = ["FsdpShard", "fsdp_shard", "fsdp_shard_dim", "fsdp_row_range", "fsdp_element_ranges",
           "fsdp_padded_numel"]


def _shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(d) for d in shape)
    if not shape:
        raise ValueError("FSDP2 shards a tensor along one of its dims; a 0-d tensor (shape ()) has none, "
                         "and fully_shard rejects it")
    if any(d < 0 for d in shape):
        raise ValueError(f"shape {list(shape)} has a negative dimension")
    return shape


def _check_rank(rank: int, world: int) -> None:
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")


def _chunk(size: int, rank: int, world: int) -> tuple[int, int]:
    """torch.chunk's cut of ``size`` indices into ``world`` chunks (padded with empty ones): ``rank``'s."""
    per_rank = -(-size // world)
    return min(size, rank * per_rank), min(size, (rank + 1) * per_rank)


def fsdp_shard_dim(shape: Sequence[int], world: int) -> int:
    """The dim a tensor of ``shape`` is sharded on over ``world`` ranks (``fsdp_wrap``'s
    ``shard_placement_fn``): 0 when ``world`` divides ``shape[0]``, else the first dim that
    ``world`` divides, else 0 (FSDP2 shards only dim 0 unevenly)."""
    shape = _shape(shape)
    _check_rank(0, world)
    if shape[0] % world == 0 or math.prod(shape) == 0:
        return 0
    return next((d for d in range(1, len(shape)) if shape[d] % world == 0), 0)


@dataclass(frozen=True)
class FsdpShard:
    """A rank's part of a tensor of shape (*outer, size, *inner): indices ``[start, end)`` of dim ``dim``.

    ``outer`` = prod(outer dims), ``inner`` = prod(inner dims). ``padded`` = ceil(size / world):
    the indices FSDP2 allocates along ``dim`` on every rank."""

    shape: tuple[int, ...]
    dim: int
    start: int
    end: int
    padded: int

    @property
    def outer(self) -> int:
        return math.prod(self.shape[: self.dim])

    @property
    def inner(self) -> int:
        return math.prod(self.shape[self.dim + 1 :])

    @property
    def numel(self) -> int:
        """Elements the rank holds: ``outer * (end - start) * inner``."""
        return self.outer * (self.end - self.start) * self.inner

    @property
    def padded_numel(self) -> int:
        """Elements FSDP2 allocates on every rank: ``outer * padded * inner``."""
        return self.outer * self.padded * self.inner

    @property
    def local_shape(self) -> tuple[int, ...]:
        """Shape of the rank's local shard (``param.to_local().shape``)."""
        return self.shape[: self.dim] + (self.end - self.start,) + self.shape[self.dim + 1 :]

    def ranges(self) -> list[tuple[int, int]]:
        """The rank's flat (row-major) elements of the tensor as ``[start, end)`` runs, in
        increasing order, adjacent runs merged: one per outer index (one in all when the rank
        holds all of dim ``dim`` or ``dim`` is 0); none when it holds nothing."""
        run = (self.end - self.start) * self.inner
        if run == 0 or self.outer == 0:
            return []
        size = self.shape[self.dim]
        if self.end - self.start == size:
            return [(0, self.outer * run)]
        period, lo = size * self.inner, self.start * self.inner
        return [(i * period + lo, i * period + lo + run) for i in range(self.outer)]


def fsdp_shard(shape: Sequence[int], rank: int, world: int, dim: int | None = None) -> FsdpShard:
    """``rank``'s part (of ``world`` ranks) of a tensor of ``shape`` that FSDP2 shards with
    ``Shard(dim)``, by its torch.chunk rule; ``dim`` defaults to ``fsdp_shard_dim(shape, world)``.

    Raises:
        ValueError: ``dim`` is out of range, or > 0 and ``world`` does not divide it (FSDP2
            raises NotImplementedError there).
    """
    shape = _shape(shape)
    _check_rank(rank, world)
    dim = fsdp_shard_dim(shape, world) if dim is None else dim
    if not 0 <= dim < len(shape):
        raise ValueError(f"dim {dim} is not a dim of shape {list(shape)}")
    if dim > 0 and shape[dim] % world:
        raise ValueError(f"FSDP2 shards dim {dim} > 0 only evenly: {shape[dim]} is not a multiple of {world} "
                         f"(shape {list(shape)})")
    start, end = _chunk(shape[dim], rank, world)
    return FsdpShard(shape, dim, start, end, -(-shape[dim] // world))


def fsdp_row_range(shape: Sequence[int], rank: int, world: int) -> tuple[int, int]:
    """Rows ``[row_start, row_end)`` of dim 0 that FSDP2's default placement (``Shard(0)``) gives
    ``rank`` of ``world`` ranks.

    Args:
        shape: the full (unsharded) tensor's shape, at least 1-D.
    Returns:
        ``(min(R, r*c), min(R, (r+1)*c))`` with ``R = shape[0]``, ``c = ceil(R / world)``;
        ``row_start == row_end`` when the rank holds no rows.
    """
    _check_rank(rank, world)
    return _chunk(_shape(shape)[0], rank, world)


def fsdp_element_ranges(shapes: Sequence[Sequence[int]], rank: int, world: int) -> list[list[tuple[int, int]]]:
    """Per tensor, ``rank``'s flat (row-major) elements as ``[start, end)`` runs within that
    tensor (:meth:`FsdpShard.ranges`), in the order of ``param.to_local().reshape(-1)``."""
    return [fsdp_shard(shape, rank, world).ranges() for shape in shapes]


def fsdp_padded_numel(shape: Sequence[int], world: int) -> int:
    """Elements FSDP2 allocates on *every* rank for a tensor of ``shape``: ``ceil(S / world) * numel / S``
    along the shard dim (``numel / world`` when ``world`` divides it)."""
    return fsdp_shard(shape, 0, world).padded_numel

