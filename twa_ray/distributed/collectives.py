"""TWA collectives over torch.distributed (the process group Ray Train sets up).

Rank r owns coordinates ``ranges[r]``; ranges differ in length, so the vectors that
go through reduce-scatter and all-gather are laid out padded to the longest range.
``bytes_sent`` counts the payload this rank hands to collectives (for benchmarks).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from ..core.collectives import from_padded, padded_length, to_padded


class TorchCollectives:
    def __init__(self, ranges: Sequence[tuple[int, int]], rank: int, world_size: int, group=None) -> None:
        if len(ranges) != world_size:
            raise ValueError(f"{len(ranges)} ranges for {world_size} ranks")
        self.ranges = list(ranges)
        self.rank = rank
        self.world_size = world_size
        self.group = group
        self.pad = padded_length(self.ranges)
        self.bytes_sent = 0

    def reduce_scatter_sum(self, flat: torch.Tensor) -> torch.Tensor:
        start, end = self.ranges[self.rank]
        if self.world_size == 1:
            return flat[start:end]
        src = to_padded(flat, self.ranges, self.pad)
        out = torch.empty(self.pad, dtype=flat.dtype, device=flat.device)
        dist.reduce_scatter_single(out, src, op=dist.ReduceOp.SUM, group=self.group)
        self.bytes_sent += src.numel() * src.element_size()
        return out[: end - start]

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
            self.bytes_sent += t.numel() * t.element_size()
        return t

    def all_gather(self, own: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        start, end = self.ranges[self.rank]
        if self.world_size == 1:
            if own.data_ptr() != out.data_ptr():
                out.copy_(own)
            return out
        if all(e - s == self.pad for s, e in self.ranges):  # equal ranges: gather in place
            dist.all_gather_single(out, own.contiguous(), group=self.group)
            self.bytes_sent += own.numel() * own.element_size()
            return out
        src = torch.zeros(self.pad, dtype=own.dtype, device=own.device)
        src[: end - start] = own
        gathered = torch.empty(self.pad * self.world_size, dtype=own.dtype, device=own.device)
        dist.all_gather_single(gathered, src, group=self.group)
        self.bytes_sent += src.numel() * src.element_size()
        return from_padded(gathered, self.ranges, self.pad, out)
