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
gives the one-process gradient, as with whole-block shards.

The same holds for a contiguous range of the flat vector that cuts through blocks
(``twa.sharding: blocks``, ``core.blocks.plan_ranges``): its part of block l is a run of
``ShardPlan.parts`` elements, zero outside its blocks l0..l1-1, and ``block_range`` keeps
only those in the projection. There ``checkpoints`` (ICLR'23) is built too: the start
point's coordinates X0 (n, L) are sums of every rank's part of each block (all-reduced in
float64), and each block's X0 is counted by one rank, the one that ``leads`` it, since TWA
sums the ranks' ``Projection.start``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .blocks import Blocks
from .projection import DEFAULT_CHUNK_BYTES, Projection
from .subspace import (RAW_BASES, AllReduce, _segments, block_coords, center_and_directions, check_start,
                       normalize_blocks, orthonormalise_blocks, orthonormalise_whole, start_point)

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
    block_range: tuple[int, int] | None = None,
    start: str | int = "mean",
    leads: Sequence[bool] | None = None,
) -> Projection:
    """This rank's rows of the candidates (n, m) -> its Projection (``candidates`` is overwritten).

    ``sizes``: this rank's part of every block (``row_block_sizes``; L entries, zeros allowed).
    ``all_reduce_sum`` / ``all_reduce_max``: elementwise sum / max over ranks (every rank calls
    them in the same order; float64 and float32 tensors on the candidates' device).
    ``center`` (m,): this rank's part of the origin (X = 0) when given, else the mean.
    The projection covers all L blocks (the coefficient gradients of the ranks add up), or
    the blocks ``block_range`` (l0, l1) when given (``sizes`` are zero outside them).

    ``checkpoints`` (ICLR'23; ranges only): ``start`` as ``build_projection``'s (``center``
    replaces it when given), ``leads`` (L,): the blocks whose start coordinates this rank counts.
    """
    raw = basis in RAW_BASES
    if basis not in ROW_BASES and not (raw and leads is not None):
        raise ValueError(f"basis {basis!r} cannot be built on row shards; use one of {list(ROW_BASES)}")
    if not raw and start != "mean":
        raise ValueError(f"start {start!r}: the {basis!r} basis (the journal algorithm) starts at the mean (X = 0); "
                         "other start points need basis 'checkpoints'")
    if sum(sizes) != candidates.shape[1]:
        raise ValueError(f"block sizes sum to {sum(sizes)}, candidates have {candidates.shape[1]} columns")
    l0, l1 = block_range or (0, len(sizes))
    if any(sizes[:l0]) or any(sizes[l1:]):
        raise ValueError(f"block_range {(l0, l1)}: this rank holds elements of blocks outside it")
    w = candidates
    if raw:
        return _raw_range_projection(w, sizes, bits, all_reduce_sum, all_reduce_max, center, start, leads,
                                     (l0, l1), max_chunk_bytes, kernel)
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
    if bounds is not None:
        bounds = (bounds[0][:, l0:l1], bounds[1][:, l0:l1])
    return Projection.from_basis(center, w, list(sizes[l0:l1]), bits, max_chunk_bytes, kernel, bounds=bounds,
                                 basis_name=basis)


def _raw_range_projection(w: torch.Tensor, sizes: Sequence[int], bits: int, all_reduce_sum: AllReduce,
                          all_reduce_max: AllReduce, center: torch.Tensor | None, start: str | int,
                          leads: Sequence[bool], block_range: tuple[int, int], max_chunk_bytes: int,
                          kernel: str | None) -> Projection:
    """``checkpoints`` on a rank's part of every block, as ``projection.build_projection`` builds
    it on whole blocks: an orthonormal basis of the raw candidates (Grams summed over ranks),
    X0 = U s per block (summed over ranks), the stored center s - Q^T X0."""
    l0, l1 = block_range
    check_start(start, w.shape[0])
    s = start_point(w, start) if center is None else center.to(w.device, torch.float32).clone()
    refs = all_reduce_sum(block_square_sums(w, sizes)).sqrt().amax(dim=0)  # max_i ||w_il|| (the center is 0)
    orthonormalise_blocks(w, sizes, refs.tolist(), all_reduce_sum)
    x0 = all_reduce_sum(block_coords(w, s, sizes)).float()[:, l0:l1]  # (n, l1 - l0), the whole blocks'
    lead = torch.tensor([bool(x) for x in leads], dtype=torch.bool, device=w.device)[l0:l1]
    bounds = block_bounds(w, sizes, all_reduce_max) if bits < 32 else None
    if bounds is not None:
        bounds = (bounds[0][:, l0:l1], bounds[1][:, l0:l1])
    zero = torch.zeros(w.shape[1], device=w.device)
    proj = Projection.from_basis(zero, w, list(sizes[l0:l1]), bits, max_chunk_bytes, kernel, bounds=bounds,
                                 start=torch.where(lead[None, :], x0, torch.zeros_like(x0)), basis_name="checkpoints")
    proj.center = s - proj.reconstruct(x0)  # reconstruct with a zero center: Q^T X0
    return proj
