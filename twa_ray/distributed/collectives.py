"""TWA collectives over torch.distributed (the process group Ray Train sets up).

Rank r owns coordinates ``ranges[r]``; ranges differ in length, so the vectors that
go through reduce-scatter and all-gather are laid out padded to the longest range.
``bytes_sent`` counts the payload this rank hands to collectives (for benchmarks).

Two ways to exchange the step's two D-sized vectors (``EXCHANGES``), chosen by measurement
(``benchmarks/comm.py --time``):
- ``sharded``: reduce-scatter of the gradient, all-gather of the weights: each moves half the
  bytes of an all-reduce on the wire. NCCL's collectives are built for this.
- ``all_reduce``: an all-reduce of the gradient (this rank keeps its slice) and an all-reduce
  of a zeroed D-vector holding this rank's weights. Twice the bytes, but on gloo a
  reduce-scatter or an all-gather each takes longer than a whole all-reduce
  (``benchmarks/RESULTS.md``), so this is the faster exchange there.
``auto`` picks ``all_reduce`` on gloo and ``sharded`` on every other backend.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from ..core.collectives import EXCHANGES, from_padded, padded_length, to_padded


def resolve_exchange(exchange: str, backend: str) -> str:
    """``twa.exchange`` -> "sharded" or "all_reduce" for a process group of ``backend``."""
    if exchange not in EXCHANGES:
        raise ValueError(f"twa.exchange: {exchange!r} is not one of {list(EXCHANGES)}")
    if exchange == "auto":
        return "all_reduce" if backend == "gloo" else "sharded"
    return exchange


class TorchCollectives:
    def __init__(self, ranges: Sequence[tuple[int, int]], rank: int, world_size: int, group=None,
                 exchange: str = "sharded") -> None:
        if len(ranges) != world_size:
            raise ValueError(f"{len(ranges)} ranges for {world_size} ranks")
        if exchange not in EXCHANGES[1:]:
            raise ValueError(f"exchange {exchange!r} is not one of {list(EXCHANGES[1:])} (resolve 'auto' first)")
        self.ranges = list(ranges)
        self.rank = rank
        self.world_size = world_size
        self.group = group
        self.exchange = exchange
        self.pad = padded_length(self.ranges)
        self.bytes_sent = 0

    def reduce_scatter_sum(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat`` (D,) is scratch: the ``all_reduce`` exchange sums into it in place."""
        start, end = self.ranges[self.rank]
        if self.world_size == 1:
            return flat[start:end]
        if self.exchange == "all_reduce":
            return self.all_reduce_sum(flat)[start:end]
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
        if self.exchange == "all_reduce":
            if own.untyped_storage().data_ptr() == out.untyped_storage().data_ptr():
                own = own.clone()  # a view of out: zeroing out would erase it
            out.zero_()
            out[start:end] = own
            return self.all_reduce_sum(out)  # the other ranks add their slices to zeros: exact
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
