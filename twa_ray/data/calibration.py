"""The batches BatchNorm statistics are recalibrated on: bounded, shuffled, seeded.

Every rank and every evaluation that recalibrates with the same seed sees the same
batches, so the running statistics agree across ranks and between model selection and
the final evaluation. Shuffled, because the first K batches of a class-sorted folder
would see only a few classes.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset, Subset


def calibration_loader(dataset: Dataset, batch_size: int, max_batches: int | None, seed: int,
                       collate_fn: Callable[[list], Any] | None = None) -> DataLoader:
    """Up to ``max_batches`` batches of ``batch_size`` examples drawn from ``dataset``
    without replacement in a seeded random order (None: the whole dataset, shuffled)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    if max_batches is not None:
        order = order[: max_batches * batch_size]
    return DataLoader(Subset(dataset, order.tolist()), batch_size=batch_size, collate_fn=collate_fn)
