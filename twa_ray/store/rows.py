"""Dim-0 row ranges of FSDP2 shards: which rows of each parameter tensor a rank holds.

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every parameter on dim 0. The rule,
from ``_FSDPParam._init_sharded_param`` (torch/distributed/fsdp/_fully_shard/_fsdp_param.py)::

    chunks = _chunk_with_empty(param, world, dim=0)   # torch.chunk, padded with empty chunks
    sharded_param = chunks[rank]
    padded_sharded_size = chunks[0].size()             # "0th always padded"

``torch.chunk(t, world, dim=0)`` cuts chunks of ``c = ceil(R / world)`` rows (the last one
shorter) and returns fewer than ``world`` chunks when R rows do not fill them, so for a
tensor of shape (R, *rest) rank r holds rows

    [min(R, r * c), min(R, (r + 1) * c))

(empty for the ranks past the last chunk, e.g. R = 5, world = 4: 2, 2, 1 and 0 rows). A 1-D
tensor is R rows of one element. Every rank *allocates* the padded size ``c x prod(rest)``
(its parameter storage, and the reduce-scatter output its gradient is a view of), whatever
its own rows. A 0-d parameter has no dim 0: FSDP2 rejects it, and so does this module.
"""
from __future__ import annotations

import math
from typing import Sequence

__all__ = ["fsdp_row_range", "fsdp_element_ranges", "fsdp_padded_numel"]


def _rows_and_width(shape: Sequence[int]) -> tuple[int, int]:
    """(R, C): dim-0 rows and elements per row of a tensor of ``shape``."""
    shape = tuple(int(d) for d in shape)
    if not shape:
        raise ValueError("FSDP2 shards dim 0; a 0-d tensor (shape ()) has none, and fully_shard rejects it")
    if any(d < 0 for d in shape):
        raise ValueError(f"shape {list(shape)} has a negative dimension")
    return shape[0], math.prod(shape[1:])


def _check_rank(rank: int, world: int) -> None:
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got {rank}")


def fsdp_row_range(shape: Sequence[int], rank: int, world: int) -> tuple[int, int]:
    """Rows ``[row_start, row_end)`` of dim 0 that FSDP2 gives ``rank`` of ``world`` ranks.

    Args:
        shape: the full (unsharded) tensor's shape, at least 1-D.
    Returns:
        ``(min(R, r*c), min(R, (r+1)*c))`` with ``R = shape[0]``, ``c = ceil(R / world)``;
        ``row_start == row_end`` when the rank holds no rows.
    """
    _check_rank(rank, world)
    rows, _ = _rows_and_width(shape)
    per_rank = -(-rows // world)
    return min(rows, rank * per_rank), min(rows, (rank + 1) * per_rank)


def fsdp_element_ranges(shapes: Sequence[Sequence[int]], rank: int, world: int) -> list[tuple[int, int]]:
    """Per tensor, the flat (row-major) element range ``[start, end)`` of ``rank``'s rows.

    Rows ``[a, b)`` of a tensor of shape (R, *rest) are its flat elements ``[a*C, b*C)``
    with ``C = prod(rest)``: one contiguous range, the order of ``param.to_local().reshape(-1)``.
    """
    out = []
    for shape in shapes:
        start, end = fsdp_row_range(shape, rank, world)
        _, width = _rows_and_width(shape)
        out.append((start * width, end * width))
    return out


def fsdp_padded_numel(shape: Sequence[int], world: int) -> int:
    """Elements FSDP2 allocates on *every* rank for a tensor of ``shape``: ``ceil(R / world) * C``."""
    _check_rank(0, world)
    rows, width = _rows_and_width(shape)
    return -(-rows // world) * width
