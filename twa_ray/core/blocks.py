"""Blocks: a partition of the parameter vector into consecutive ranges of whole tensors.

Granularity
- ``model``: one block holding every coordinate;
- ``tensor``: one block per parameter tensor;
- ``size:N``: consecutive tensors grouped until a block holds at least N elements.

Every block is a run of whole tensors, so a block is a contiguous range of the flat
vector. Shards of k workers (``plan_ranges``, what ``twa.sharding: blocks`` uses) are
balanced contiguous ranges of the flat vector that cut through blocks: rank r owns
[r*D//k, (r+1)*D//k) and a part of each block it touches (``ShardPlan.parts``); the
per-block maths of a cut block is reduced across ranks (``core.row_shards``).
``plan_shards`` keeps the older shards of whole blocks, balanced by bytes.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

from .quant import packed_bytes

GRANULARITY_HELP = "'model', 'tensor' or 'size:N' (N a positive integer)"


def parse_granularity(granularity: str) -> tuple[str, int]:
    """'model' | 'tensor' | 'size:N' -> (kind, N); raises ValueError naming the value."""
    if granularity in ("model", "tensor"):
        return granularity, 0
    if isinstance(granularity, str) and granularity.startswith("size:"):
        try:
            n = int(granularity[5:])
        except ValueError:
            n = 0
        if n > 0:
            return "size", n
    raise ValueError(f"granularity {granularity!r} is not one of {GRANULARITY_HELP}")


@dataclass(frozen=True)
class Blocks:
    """Block l holds tensors ``tensor_ranges[l] = (t0, t1)`` and coordinates ``[starts[l], ends[l])``."""

    tensor_ranges: tuple[tuple[int, int], ...]
    starts: tuple[int, ...]
    ends: tuple[int, ...]
    tensor_offsets: tuple[int, ...] = ()  # where each tensor starts in the flat vector, then D

    @property
    def sizes(self) -> list[int]:
        return [e - s for s, e in zip(self.starts, self.ends)]

    def __len__(self) -> int:
        return len(self.starts)


def make_blocks(numels: Sequence[int], granularity: str) -> Blocks:
    """Partition tensors with element counts ``numels`` (in layout order) into blocks."""
    kind, min_size = parse_granularity(granularity)
    if kind == "model":
        groups = [(0, len(numels))]
    elif kind == "tensor":
        groups = [(t, t + 1) for t in range(len(numels))]
    else:
        groups, t0, acc = [], 0, 0
        for t, m in enumerate(numels):
            acc += m
            if acc >= min_size:
                groups.append((t0, t + 1))
                t0, acc = t + 1, 0
        if t0 < len(numels):
            if groups:  # a short tail joins the previous block so every block reaches N
                groups[-1] = (groups[-1][0], len(numels))
            else:
                groups.append((t0, len(numels)))
    offsets = [0]
    for m in numels:
        offsets.append(offsets[-1] + m)
    return Blocks(
        tensor_ranges=tuple(groups),
        starts=tuple(offsets[a] for a, _ in groups),
        ends=tuple(offsets[b] for _, b in groups),
        tensor_offsets=tuple(offsets),
    )


def shard_blocks(sizes: Sequence[int], bits: int, world_size: int) -> list[tuple[int, int]]:
    """Split blocks into ``world_size`` runs of consecutive blocks, balanced by bytes.

    Returns ``[(l0, l1)]`` per rank (rank r owns blocks l0..l1-1). Minimises the largest
    shard's bytes (binary search over the cap with a greedy fill). Raises ValueError
    when there are fewer blocks than workers.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if len(sizes) < world_size:
        raise ValueError(
            f"{len(sizes)} block(s) cannot be shared by {world_size} workers: "
            "use a finer granularity ('tensor' or 'size:N') or fewer workers"
        )
    weights = [packed_bytes(m, bits) for m in sizes]

    def fill(cap: int) -> list[tuple[int, int]] | None:
        runs, l0, acc = [], 0, 0
        for l, w in enumerate(weights):
            remaining_blocks = len(weights) - l
            remaining_ranks = world_size - len(runs)
            # close the run when it would pass the cap, or when each later rank needs a block
            if l > l0 and (acc + w > cap or remaining_blocks < remaining_ranks):
                runs.append((l0, l))
                l0, acc = l, 0
            acc += w
        runs.append((l0, len(weights)))
        return runs if len(runs) == world_size else None

    lo, hi = max(weights), sum(weights)
    while lo < hi:
        mid = (lo + hi) // 2
        runs = fill(mid)
        if runs is not None and max(sum(weights[a:b]) for a, b in runs) <= mid:
            hi = mid
        else:
            lo = mid + 1
    runs = fill(lo)
    assert runs is not None
    return runs


@dataclass(frozen=True)
class ShardPlan:
    """What each of ``world_size`` ranks owns: blocks, coordinates and parameter tensors."""

    block_runs: tuple[tuple[int, int], ...]  # (l0, l1) per rank
    ranges: tuple[tuple[int, int], ...]  # coordinates [start, end) per rank
    tensor_runs: tuple[tuple[int, int], ...]  # parameter tensors [t0, t1) per rank (whole or in part)
    # per rank, its elements of each block l0..l1-1 (the whole blocks' sizes for ``plan_shards``)
    parts: tuple[tuple[int, ...], ...] = ()

    def shard_bytes(self, blocks: Blocks, bits: int, num_candidates: int) -> list[int]:
        """Projection bytes each rank holds: n x sum over its (parts of) blocks of ceil(m*b/8)."""
        return [num_candidates * sum(packed_bytes(m, bits) for m in part) for part in self.parts]

    def leads(self, blocks: Blocks, rank: int) -> list[bool]:
        """Per block l0..l1-1 of ``rank``: whether its first element is this rank's (one rank
        of those that share a block leads it)."""
        (l0, l1), (start, _) = self.block_runs[rank], self.ranges[rank]
        return [blocks.starts[l] >= start for l in range(l0, l1)]

    def tensor_element_ranges(self, blocks: Blocks, rank: int) -> list[tuple[int, int]]:
        """Per parameter tensor, the element range [a, b) within it that ``rank`` owns
        ((0, 0) for a tensor it holds nothing of): what it reads of the candidate store."""
        start, end = self.ranges[rank]
        offsets = blocks.tensor_offsets
        return [(min(max(start - o, 0), e - o), min(max(end - o, 0), e - o)) for o, e in zip(offsets, offsets[1:])]


def plan_shards(blocks: Blocks, bits: int, world_size: int) -> ShardPlan:
    """Column shards for ``world_size`` workers: consecutive whole blocks balanced by bytes."""
    runs = shard_blocks(blocks.sizes, bits, world_size)
    sizes = blocks.sizes
    return ShardPlan(
        block_runs=tuple(runs),
        ranges=tuple((blocks.starts[a], blocks.ends[b - 1]) for a, b in runs),
        tensor_runs=tuple((blocks.tensor_ranges[a][0], blocks.tensor_ranges[b - 1][1]) for a, b in runs),
        parts=tuple(tuple(sizes[a:b]) for a, b in runs),
    )


def balanced_ranges(total: int, world_size: int) -> list[tuple[int, int]]:
    """[r*total//k, (r+1)*total//k) per rank r of k = ``world_size``: lengths differ by at most 1."""
    return [(r * total // world_size, (r + 1) * total // world_size) for r in range(world_size)]


def plan_ranges(blocks: Blocks, bits: int, world_size: int) -> ShardPlan:
    """Shards for ``world_size`` workers as balanced contiguous ranges of the flat vector
    (``balanced_ranges``), cut through blocks and tensors where they fall (``bits``: unused,
    kept for ``plan_shards``' signature: elements balance the packed bytes to a byte per
    cut block and candidate). Raises ValueError when there are fewer coordinates than workers."""
    if world_size < 1:
        raise ValueError(f"world_size (the number of workers) must be >= 1, got {world_size}")
    total = blocks.ends[-1] if len(blocks) else 0
    if total < world_size:
        raise ValueError(f"{total} coordinate(s) cannot be shared by {world_size} workers: use fewer workers")
    offsets = blocks.tensor_offsets
    runs, tensors, parts = [], [], []
    ranges = balanced_ranges(total, world_size)
    for start, end in ranges:
        l0 = bisect.bisect_right(blocks.ends, start)  # the first block ending after start
        l1 = bisect.bisect_left(blocks.starts, end)  # the blocks starting before end
        runs.append((l0, l1))
        parts.append(tuple(min(end, blocks.ends[l]) - max(start, blocks.starts[l]) for l in range(l0, l1)))
        if offsets:
            tensors.append((bisect.bisect_right(offsets, start) - 1, bisect.bisect_left(offsets, end)))
        else:
            tensors.append((blocks.tensor_ranges[l0][0], blocks.tensor_ranges[l1 - 1][1]))
    return ShardPlan(block_runs=tuple(runs), ranges=tuple(ranges), tensor_runs=tuple(tensors), parts=tuple(parts))
