"""Row shards: the projection of a rank that holds some rows of every tensor (FSDP2).

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) rank r holds rows [a_r, b_r) of dim 0
of every parameter tensor, so it holds a part of every block, not whole blocks (the
``blocks`` sharding, ``core.blocks.plan_shards``). Its coordinates, in layout order, are
its rows of tensor 0, then of tensor 1, ...; the part of block l it holds is still one
contiguous run of them (its tensors' rows), of ``row_block_sizes`` elements.

Everything per coordinate is local (center, directions, codes); every per-block quantity
is a sum or a maximum over ranks:

- the block norms ||d_il|| (``normalized``) and each block's scale for the dead-direction
  test: sums of squares, all-reduced in float64;
- the Gram matrices of the orthonormal bases: sums of the local Grams;
- the quantisation range (min, max) per (candidate, block): a maximum over ranks.

So a rank's rows of Q are the same rows of the one-process Q (the norms differ only in
the float64 order of their sums), and summing the ranks' partial coefficient gradients
gives the one-process gradient, as with whole-block shards. ``checkpoints`` (ICLR'23) is
not built this way: its start point's coordinates would need the same treatment.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .blocks import Blocks
from .projection import DEFAULT_CHUNK_BYTES, Projection
from .subspace import (AllReduce, _segments, center_and_directions, normalize_blocks, orthonormalise_blocks,
                       orthonormalise_whole)

ROW_BASES = ("normalized", "orthonormal", "orthonormal-global")


def row_block_sizes(blocks: Blocks, row_numels: Sequence[int]) -> list[int]:
    """The part of each block a rank holds: ``row_numels[t]`` = its elements of tensor t."""
    return [sum(row_numels[a:b]) for a, b in blocks.tensor_ranges]


def block_square_sums(d: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Rows d (n, m) -> (n, L) float64 sums of squares over each block's columns."""
    out = torch.zeros(d.shape[0], len(sizes), dtype=torch.float64, device=d.device)
    for l, (a, b) in enumerate(_segments(sizes)):
        if b > a:
            out[:, l] = torch.linalg.vector_norm(d[:, a:b], dim=1, dtype=torch.float64).square()
    return out


def block_bounds(u: torch.Tensor, sizes: Sequence[int], all_reduce_max: AllReduce) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi), each (n, L) float32: min and max of every (row, block) over all ranks' parts
    (0 and 0 for a block no rank holds an element of). ``all_reduce_max``: elementwise max
    over ranks of a float32 tensor."""
    n, L = u.shape[0], len(sizes)
    hi = torch.full((n, L), -torch.inf, device=u.device)
    neg_lo = torch.full((n, L), -torch.inf, device=u.device)
    for l, (a, b) in enumerate(_segments(sizes)):
        if b > a:
            hi[:, l] = u[:, a:b].amax(dim=1)
            neg_lo[:, l] = -u[:, a:b].amin(dim=1)
    both = all_reduce_max(torch.stack([hi, neg_lo]))
    hi, lo = both[0], -both[1]
    empty = lo > hi
    return lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)


def build_row_projection(
    candidates: torch.Tensor,
    sizes: Sequence[int],
    basis: str,
    bits: int,
    all_reduce_sum: AllReduce,
    all_reduce_max: AllReduce,
    *,
    center: torch.Tensor | None = None,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    kernel: str | None = None,
) -> Projection:
    """This rank's rows of the candidates (n, m) -> its Projection (``candidates`` is overwritten).

    ``sizes``: this rank's part of every block (``row_block_sizes``; L entries, zeros allowed).
    ``all_reduce_sum`` / ``all_reduce_max``: elementwise sum / max over ranks (every rank calls
    them in the same order; float64 and float32 tensors on the candidates' device).
    ``center`` (m,): this rank's part of the origin (X = 0) when given, else the mean.
    The projection covers all L blocks: the coefficient gradients of the ranks add up.
    """
    if basis not in ROW_BASES:
        raise ValueError(f"basis {basis!r} cannot be built on row shards; use one of {list(ROW_BASES)}")
    if sum(sizes) != candidates.shape[1]:
        raise ValueError(f"block sizes sum to {sum(sizes)}, candidates have {candidates.shape[1]} columns")
    w = candidates
    center = center_and_directions(w, center)
    # squared norms of the center (row 0) and of the directions, summed over ranks
    squares = all_reduce_sum(torch.cat([block_square_sums(center[None], sizes), block_square_sums(w, sizes)]))
    norms = squares.sqrt()
    refs = norms.amax(dim=0)  # per block: max(||c||, max_i ||d_i||), as subspace's single-process scale
    if basis == "normalized":
        normalize_blocks(w, sizes, norms[1:], refs.tolist())
    elif basis == "orthonormal":
        orthonormalise_blocks(w, sizes, refs.tolist(), all_reduce_sum)
    else:
        orthonormalise_whole(w, float(refs.square().sum().sqrt()), all_reduce_sum)
    bounds = block_bounds(w, sizes, all_reduce_max) if bits < 32 else None
    return Projection.from_basis(center, w, sizes, bits, max_chunk_bytes, kernel, bounds=bounds, basis_name=basis)
