"""How the eager kernels cut a run of blocks into chunks, and the sizes that bound them.

A chunk is a stretch of the run that one step of the eager (and triton) kernels streams:
its packed bytes are turned into float codes in a buffer that stays in the cache, then
used in one matrix-vector product. Large blocks get chunks of their own; small blocks
(biases, norms) share one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..quant import packed_bytes

# Float codes of one chunk (b < 32) stay within this many bytes (and max_chunk_bytes):
# they are read back from the last-level cache, not L2, since smaller chunks pay more
# per-operation overhead (benchmarks/RESULTS.md).
CACHE_CHUNK_BYTES = 4 << 20
# The coefficient gradient's dot products add at most this many float32 products before
# the partial sums go on in float64: a long float32 sum loses digits as it grows.
SUM_PIECE = 1 << 15
# Blocks below this size share chunks (one pass for many small tensors: biases, norms);
# larger ones get chunks of their own, whose dot products use the piecewise sums.
GROUP_MAX_ELEMS = 1 << 12


def centre_code(bits: int) -> int:
    """2^(b-1): the coefficient gradient works on code - 2^(b-1), which fits int8 even
    read in place as (code - 2^(b-1)) * 2^(k*b), for every k."""
    return 1 << (bits - 1)


@dataclass(frozen=True)
class Chunk:
    """Elements [start, end) of the run, stored in data columns [col_start, col_end).

    ``block`` is set when the chunk lies in one block; otherwise ``seg`` (end-start,)
    gives each element's local block and ``keep`` the positions of real (non padding)
    codes among the unpacked ones.
    """

    start: int
    end: int
    col_start: int
    col_end: int
    block: int | None
    seg: torch.Tensor | None
    keep: torch.Tensor | None


def chunk_elems(max_chunk_bytes: int, n: int, bits: int) -> int:
    """Elements per chunk: float32 codes of one chunk, n * chunk_elems * 4 bytes, within
    ``max_chunk_bytes`` (b < 32: also within CACHE_CHUNK_BYTES; b = 32 streams the stored
    floats, no temporary); a multiple of 64, at least 64."""
    budget = max_chunk_bytes if bits == 32 else min(max_chunk_bytes, CACHE_CHUNK_BYTES)
    return max(64, (budget // (4 * max(1, n))) // 64 * 64)


def plan_chunks(sizes: Sequence[int], bits: int, chunk_elems: int, device) -> list[Chunk]:
    """Cut the run into chunks of at most ``chunk_elems`` elements (a multiple of 8).

    A large block is cut into pieces; neighbouring blocks of fewer than GROUP_MAX_ELEMS
    elements share a chunk.
    """
    per_col = 1 if bits == 32 else 8 // bits  # elements per data column
    starts, cols, pos, col = [], [], 0, 0
    for m in sizes:
        starts.append(pos)
        cols.append(col)
        pos += m
        col += m if bits == 32 else packed_bytes(m, bits)
    starts.append(pos)
    cols.append(col)

    chunks: list[Chunk] = []
    group: list[int] = []

    def flush() -> None:
        if not group:
            return
        l0, l1 = group[0], group[-1] + 1
        if len(group) == 1:
            chunks.append(Chunk(starts[l0], starts[l1], cols[l0], cols[l1], l0, None, None))
        else:
            seg = torch.cat([torch.full((sizes[l],), l, dtype=torch.long, device=device) for l in group])
            keep = torch.cat(
                [torch.arange(sizes[l], device=device) + (cols[l] - cols[l0]) * per_col for l in group]
            )
            chunks.append(Chunk(starts[l0], starts[l1], cols[l0], cols[l1], None, seg, keep))
        group.clear()

    group_elems = 0
    for l, m in enumerate(sizes):
        if m == 0:
            continue
        if m >= min(chunk_elems, GROUP_MAX_ELEMS):
            flush()
            group_elems = 0
            for a in range(0, m, chunk_elems):
                b = min(m, a + chunk_elems)
                col_a = cols[l] + (a if bits == 32 else a // per_col)
                col_b = cols[l] + (b if bits == 32 else packed_bytes(b, bits))
                chunks.append(Chunk(starts[l] + a, starts[l] + b, col_a, col_b, l, None, None))
            continue
        if group_elems + m > chunk_elems:
            flush()
            group_elems = 0
        group.append(l)
        group_elems += m
    flush()
    return chunks
