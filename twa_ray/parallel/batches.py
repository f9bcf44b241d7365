"""Global batches split across workers, in a seeded order that a restarted run repeats.

Every worker draws the same permutation of the dataset for an epoch (seeded by the
run seed and the epoch), cuts it into global batches of ``batch_size``, and takes its
contiguous slice of each: rank r gets positions [r*B/k, (r+1)*B/k) of a global batch.
So k workers see exactly the batches one worker would, and a run resumed at step s of
an epoch skips the first s batches.

A last global batch too small to give every rank an example would leave a rank with an
empty slice: that rank would skip the forward pass while the others wait in
SyncBatchNorm's collective. Base training drops such a batch (``drop_last``); TWA folds it
into the previous batch (``min_last``), so the epoch still covers every example once.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def epoch_order(num_examples: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation (num_examples,) of an epoch; the same on every worker."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_examples, generator=gen)


def local_slice(global_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank r's slice [a, b) of a global batch of ``global_size``; sizes differ by at most 1."""
    return global_size * rank // world_size, global_size * (rank + 1) // world_size


def global_batch_sizes(num_examples: int, batch_size: int, drop_last: bool = False, min_last: int = 0) -> list[int]:
    """Sizes of an epoch's global batches: full batches, then the remainder.

    ``drop_last`` drops a remainder; otherwise a remainder smaller than ``min_last``
    joins the previous batch (when there is one).
    """
    sizes = [batch_size] * (num_examples // batch_size)
    remainder = num_examples % batch_size
    if remainder and not drop_last:
        if remainder < min_last and sizes:
            sizes[-1] += remainder
        else:
            sizes.append(remainder)
    return sizes


def batches_per_epoch(num_examples: int, batch_size: int, drop_last: bool = False, min_last: int = 0) -> int:
    return len(global_batch_sizes(num_examples, batch_size, drop_last, min_last))


class ShardedBatchSampler(Sampler[list[int]]):
    """Yields this rank's indices of each global batch of one epoch, from ``start_batch`` on.

    ``global_sizes[j]`` is the size of the j-th yielded global batch: dividing a summed
    local loss by it makes the sum over workers the global batch's mean loss.
    ``drop_last`` and ``min_last`` treat a small last batch as in :func:`global_batch_sizes`;
    with ``min_last`` a global batch still smaller than it raises ValueError (the whole
    epoch is one such batch).
    """

    def __init__(
        self, num_examples: int, batch_size: int, rank: int, world_size: int, seed: int,
        epoch: int, start_batch: int = 0, drop_last: bool = False, min_last: int = 0,
    ) -> None:
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = epoch
        self.start_batch = start_batch
        self.drop_last = drop_last
        self.global_sizes: list[int] = []
        sizes = global_batch_sizes(num_examples, batch_size, drop_last, min_last)
        if sizes and min(sizes) < min_last:
            raise ValueError(f"{num_examples} examples in batches of {batch_size} leave a global batch of "
                             f"{min(sizes)}, fewer than {min_last}")
        order = epoch_order(num_examples, seed, epoch)
        self._batches = []
        for b in range(start_batch, len(sizes)):
            batch = order[b * batch_size : b * batch_size + sizes[b]]
            lo, hi = local_slice(len(batch), rank, world_size)
            self._batches.append(batch[lo:hi].tolist())
            self.global_sizes.append(len(batch))

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)


def loader_for(dataset: Dataset, sampler: ShardedBatchSampler, num_workers: int = 0, pin_memory: bool = False,
               collate_fn: Callable[[list], Any] | None = None) -> DataLoader:
    """A DataLoader over this rank's slices, batched by ``collate_fn`` (a task's; default
    torch's, with which an empty slice yields an empty (images, labels) batch)."""
    return DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
        collate_fn=collate_fn or _collate_allow_empty,
    )


def _collate_allow_empty(items):
    if not items:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    from torch.utils.data import default_collate

    return default_collate(items)
