"""Granularity, blocks and column shards."""
import pytest

from twa_ray.core.blocks import make_blocks, parse_granularity, plan_shards, shard_blocks
from twa_ray.core.quant import packed_bytes


def test_granularities():
    numels = [10, 5, 30, 2, 50]
    assert make_blocks(numels, "model").sizes == [97]
    assert make_blocks(numels, "tensor").sizes == numels
    blocks = make_blocks(numels, "size:12")
    assert blocks.tensor_ranges == ((0, 2), (2, 3), (3, 5))
    assert blocks.sizes == [15, 30, 52]
    assert blocks.starts == (0, 15, 45) and blocks.ends == (15, 45, 97)
    # a short tail joins the previous block
    assert make_blocks([10, 10, 3], "size:10").sizes == [10, 13]
    assert make_blocks([3, 3], "size:100").sizes == [6]


@pytest.mark.parametrize("bad", ["layer", "size:0", "size:x", "size:-3", ""])
def test_bad_granularity_named(bad):
    with pytest.raises(ValueError, match="granularity"):
        parse_granularity(bad)


def test_shards_cover_blocks_and_balance_bytes():
    sizes = [100, 3, 50, 50, 7, 200, 1, 90]
    for bits in (1, 4, 32):
        for k in (1, 2, 3, 4):
            runs = shard_blocks(sizes, bits, k)
            assert len(runs) == k
            assert runs[0][0] == 0 and runs[-1][1] == len(sizes)
            assert all(a < b for a, b in runs)
            assert all(runs[i][1] == runs[i + 1][0] for i in range(k - 1))
            loads = [sum(packed_bytes(m, bits) for m in sizes[a:b]) for a, b in runs]
            # the optimum is at least the largest block and at least the mean load
            lower = max(max(packed_bytes(m, bits) for m in sizes), -(-sum(loads) // k))
            assert max(loads) <= lower + max(packed_bytes(m, bits) for m in sizes)


def test_equal_blocks_split_evenly():
    assert shard_blocks([10] * 8, 32, 2) == [(0, 4), (4, 8)]
    assert shard_blocks([10] * 9, 32, 3) == [(0, 3), (3, 6), (6, 9)]


def test_more_workers_than_blocks_is_an_error():
    with pytest.raises(ValueError, match="2 block"):
        shard_blocks([5, 5], 8, 3)


def test_shard_balance_is_optimal_against_brute_force():
    import itertools

    sizes = [100, 3, 50, 50, 7, 200, 1, 90, 64]
    for bits in (2, 32):
        w = [packed_bytes(m, bits) for m in sizes]
        for k in (2, 3, 4):
            best = min(
                max(sum(w[a:b]) for a, b in zip((0,) + cuts, cuts + (len(w),)))
                for cuts in itertools.combinations(range(1, len(w)), k - 1)
            )
            runs = shard_blocks(sizes, bits, k)
            assert max(sum(w[a:b]) for a, b in runs) == best


def test_shard_plan_maps_blocks_to_coordinates_and_tensors():
    numels = [10, 5, 30, 2, 50, 8]
    blocks = make_blocks(numels, "size:12")  # tensors (0,2) (2,3) (3,5) (5,6)
    plan = plan_shards(blocks, 32, 2)
    assert plan.ranges[0][0] == 0 and plan.ranges[-1][1] == sum(numels)
    assert plan.ranges[0][1] == plan.ranges[1][0]
    for (t0, t1), (s, e) in zip(plan.tensor_runs, plan.ranges):
        assert sum(numels[:t0]) == s and sum(numels[:t1]) == e
    assert sum(plan.shard_bytes(blocks, 4, 3)) == 3 * sum(packed_bytes(m, 4) for m in blocks.sizes)
