"""Sharded global batches: every rank gets an example of every batch, and an epoch covers
every example exactly once, also when the last batch is smaller than the number of ranks."""
import pytest

from twa_ray.parallel.batches import ShardedBatchSampler, batches_per_epoch, epoch_order, global_batch_sizes


def _epoch(n: int, batch_size: int, world: int, start_batch: int = 0) -> list[list[list[int]]]:
    """[rank][batch] -> indices, with TWA's rule min_last=world."""
    return [list(ShardedBatchSampler(n, batch_size, r, world, seed=5, epoch=2, start_batch=start_batch, min_last=world))
            for r in range(world)]


@pytest.mark.parametrize("n, batch_size, world", [(33, 8, 2), (41, 8, 4), (43, 8, 4), (17, 4, 3), (24, 8, 3), (9, 4, 4)])
def test_uneven_last_batch_gives_every_rank_an_example_and_covers_the_epoch_once(n, batch_size, world):
    ranks = _epoch(n, batch_size, world)
    sizes = global_batch_sizes(n, batch_size, min_last=world)
    assert all(len(batches) == len(sizes) == batches_per_epoch(n, batch_size, min_last=world) for batches in ranks)
    assert all(len(part) >= 1 for batches in ranks for part in batches)  # no empty slice: every rank runs forward
    joined = [sum((ranks[r][j] for r in range(world)), []) for j in range(len(sizes))]
    assert [len(b) for b in joined] == sizes
    assert sum(joined, []) == epoch_order(n, 5, 2).tolist()  # the global batches, in order, each example once
    assert all(s >= world for s in sizes)


def test_a_remainder_smaller_than_the_ranks_joins_the_previous_batch():
    assert global_batch_sizes(33, 8, min_last=2) == [8, 8, 8, 9]
    assert global_batch_sizes(34, 8, min_last=2) == [8, 8, 8, 8, 2]
    assert global_batch_sizes(33, 8) == [8, 8, 8, 8, 1]  # base training's rule: kept ...
    assert global_batch_sizes(33, 8, drop_last=True) == [8, 8, 8, 8]  # ... or dropped
    sampler = ShardedBatchSampler(33, 8, 0, 2, seed=5, epoch=2, min_last=2)
    assert sampler.global_sizes == [8, 8, 8, 9]


def test_one_rank_keeps_the_batches_of_before():
    one = ShardedBatchSampler(33, 8, 0, 1, seed=5, epoch=2, min_last=1)
    assert one.global_sizes == [8, 8, 8, 8, 1]


def test_resume_inside_an_epoch_yields_the_remaining_batches():
    full, resumed = _epoch(43, 8, 4), _epoch(43, 8, 4, start_batch=3)
    assert all(resumed[r] == full[r][3:] for r in range(4))


def test_too_few_examples_for_the_ranks_is_an_error():
    with pytest.raises(ValueError, match="global batch of 3, fewer than 4"):
        ShardedBatchSampler(3, 8, 0, 4, seed=0, epoch=0, min_last=4)
    assert global_batch_sizes(0, 8, min_last=2) == []
