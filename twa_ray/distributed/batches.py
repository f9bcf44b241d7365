"""Global batches split across workers, in a seeded order that a restarted run repeats.

Every worker draws the same permutation of the dataset for an epoch (seeded by the
run seed and the epoch), cuts it into global batches of ``batch_size``, and takes its
contiguous slice of each: rank r gets positions [r*B/k, (r+1)*B/k) of a global batch.
So k workers see exactly the batches one worker would, and a run resumed at step s of
an epoch skips the first s batches.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def epoch_order(num_examples: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation (num_examples,) of an epoch; the same on every worker."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_examples, generator=gen)


def local_slice(global_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank r's slice [a, b) of a global batch of ``global_size``; sizes differ by at most 1."""
    return global_size * rank // world_size, global_size * (rank + 1) // world_size


def batches_per_epoch(num_examples: int, batch_size: int, drop_last: bool = False) -> int:
    return num_examples // batch_size if drop_last else -(-num_examples // batch_size)


class ShardedBatchSampler(Sampler[list[int]]):
    """Yields this rank's indices of each global batch of one epoch, from ``start_batch`` on.

    ``global_sizes[j]`` is the size of the j-th yielded global batch: dividing a summed
    local loss by it makes the sum over workers the global batch's mean loss.
    """

    def __init__(
        self, num_examples: int, batch_size: int, rank: int, world_size: int, seed: int,
        epoch: int, start_batch: int = 0, drop_last: bool = False,
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
        order = epoch_order(num_examples, seed, epoch)
        self._batches = []
        for b in range(start_batch, batches_per_epoch(num_examples, batch_size, drop_last)):
            batch = order[b * batch_size : (b + 1) * batch_size]
            lo, hi = local_slice(len(batch), rank, world_size)
            self._batches.append(batch[lo:hi].tolist())
            self.global_sizes.append(len(batch))

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)


def loader_for(dataset: Dataset, sampler: ShardedBatchSampler, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over this rank's slices; an empty slice yields an empty batch."""
    return DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
        collate_fn=_collate_allow_empty,
    )


def _collate_allow_empty(items):
    if not items:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    from torch.utils.data import default_collate

    return default_collate(items)
