"""Element ranges: the unit of partial reads and writes of a candidate.

A range is ``(start, end)``, the elements ``[start, end)`` of one tensor flattened (row-major).
``CandidateStore.read_ranges``, ``write_rows`` and ``read_rows`` take per tensor (store order)
one range or a list of increasing, non-overlapping ones; which ranges a worker owns is the
caller's business (the row maths of ``twa_ray.core``).
"""

from __future__ import annotations

import operator
from typing import Sequence

__all__ = ["Ranges", "as_runs", "checked_ranges"]

Ranges = Sequence["tuple[int, int] | Sequence[tuple[int, int]]"]  # per tensor: one range, or several


def as_runs(runs) -> list[tuple[int, int]]:
    """One tensor's ranges as a list of int pairs: ``(start, end)`` is one range, else a sequence of them."""
    if len(runs) == 2:
        try:
            return [(operator.index(runs[0]), operator.index(runs[1]))]
        except TypeError:  # two ranges
            pass
    return [(operator.index(a), operator.index(b)) for a, b in runs]


def checked_ranges(ranges: Ranges, names: Sequence[str], numels: Sequence[int],
                   uri: str) -> tuple[list[list[tuple[int, int]]], int]:
    """(per tensor its non-empty ranges as ints, adjacent ones merged; their total length).
    ValueError when they do not fit the tensors ``names`` of ``numels`` elements (of the store
    at ``uri``) or overlap."""
    if len(ranges) != len(names):
        raise ValueError(f"got {len(ranges)} ranges for the {len(names)} tensors of store {uri}")
    out = []
    for name, runs, numel in zip(names, ranges, numels):
        merged: list[tuple[int, int]] = []
        for a, b in as_runs(runs):
            if not 0 <= a <= b <= numel:
                raise ValueError(f"range [{a}, {b}) does not fit parameter {name!r} of {numel} elements")
            if a == b:
                continue
            if merged and a < merged[-1][1]:
                raise ValueError(f"parameter {name!r}: range [{a}, {b}) overlaps or precedes "
                                 f"[{merged[-1][0]}, {merged[-1][1]}); give increasing, disjoint ranges")
            if merged and a == merged[-1][1]:
                merged[-1] = (merged[-1][0], b)
            else:
                merged.append((a, b))
        out.append(merged)
    return out, sum(b - a for runs in out for a, b in runs)
