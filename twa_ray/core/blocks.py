"""Blocks: a partition of the parameter vector into consecutive ranges of whole tensors.

Granularity
- ``model``: one block holding every coordinate;
- ``tensor``: one block per parameter tensor;
- ``size:N``: consecutive tensors grouped until a block holds at least N elements.

Every block is a run of whole tensors, so a block is a contiguous range of the flat
vector, and a shard (a run of whole blocks) is contiguous too.
"""
from __future__ import annotations

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
    tensor_runs: tuple[tuple[int, int], ...]  # parameter tensors [t0, t1) per rank

    def shard_bytes(self, blocks: Blocks, bits: int, num_candidates: int) -> list[int]:
        """Projection bytes each rank holds: n x sum of its blocks' ceil(m*b/8)."""
        sizes = blocks.sizes
        return [num_candidates * sum(packed_bytes(m, bits) for m in sizes[a:b]) for a, b in self.block_runs]


def plan_shards(blocks: Blocks, bits: int, world_size: int) -> ShardPlan:
    """Column shards for ``world_size`` workers: consecutive whole blocks balanced by bytes."""
    runs = shard_blocks(blocks.sizes, bits, world_size)
    return ShardPlan(
        block_runs=tuple(runs),
        ranges=tuple((blocks.starts[a], blocks.ends[b - 1]) for a, b in runs),
        tensor_runs=tuple((blocks.tensor_ranges[a][0], blocks.tensor_ranges[b - 1][1]) for a, b in runs),
    )
