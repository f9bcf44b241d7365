"""The three collectives a TWA step needs, and the single-process version.

Coordinates are split into contiguous per-rank ranges ``ranges[r] = (start, end)``
(rank r owns whole blocks). The implementations over torch.distributed, one per
``twa.exchange``, live in ``twa_ray.parallel.exchanges``; this module stays free of process groups.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch


# twa.exchange's values as the config validates them (the config imports no parallel code):
# "auto" and the keys of twa_ray.parallel.exchanges.EXCHANGES, the registry of their classes
# (tests/parallel/test_exchange.py checks that the two agree)
EXCHANGES = ("auto", "sharded", "all_reduce", "ring")


class Collectives(Protocol):
    rank: int
    world_size: int
    ranges: Sequence[tuple[int, int]]

    def reduce_scatter_sum(self, flat: torch.Tensor) -> torch.Tensor:
        """(D,) local vector -> (end_r - start_r,) sum over ranks of this rank's range.
        ``flat`` is scratch: an implementation may overwrite it.

        Workers scale their local loss by local/global batch size, so the sum is the
        gradient of the global batch's mean loss.
        """

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Elementwise sum over ranks (in place where possible; returns the result)."""

    def all_gather(self, own: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Each rank's (end_r - start_r,) slice -> the full (D,) vector in ``out``."""


class LocalCollectives:
    """One process: the collectives are identities over the single range."""

    rank = 0
    world_size = 1

    def __init__(self, num_params: int) -> None:
        self.ranges = [(0, num_params)]

    def reduce_scatter_sum(self, flat: torch.Tensor) -> torch.Tensor:
        return flat

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def all_gather(self, own: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if own.data_ptr() != out.data_ptr():
            out.copy_(own)
        return out


def padded_length(ranges: Sequence[tuple[int, int]]) -> int:
    """Length every rank's slice is padded to, so reduce-scatter/all-gather sizes agree."""
    return max(e - s for s, e in ranges)


def to_padded(flat: torch.Tensor, ranges: Sequence[tuple[int, int]], pad: int) -> torch.Tensor:
    """(D,) -> (k * pad,) with rank r's range at [r*pad, r*pad + len_r) and zeros after."""
    if all(e - s == pad for s, e in ranges):
        return flat  # equal ranges: the flat vector already has the padded layout
    out = torch.zeros(len(ranges) * pad, dtype=flat.dtype, device=flat.device)
    for r, (s, e) in enumerate(ranges):
        out[r * pad : r * pad + (e - s)] = flat[s:e]
    return out


def from_padded(padded: torch.Tensor, ranges: Sequence[tuple[int, int]], pad: int, out: torch.Tensor) -> torch.Tensor:
    """Inverse of ``to_padded`` into ``out`` (D,)."""
    if padded.data_ptr() == out.data_ptr():
        return out
    for r, (s, e) in enumerate(ranges):
        out[s:e] = padded[r * pad : r * pad + (e - s)]
    return out
