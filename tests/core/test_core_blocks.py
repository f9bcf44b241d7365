"""Granularity, blocks and column shards."""
import pytest

from twa_ray.core.blocks import balanced_ranges, make_blocks, parse_granularity, plan_ranges, plan_shards, shard_blocks
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


def test_ranges_cut_blocks_and_tensors_evenly():
    """plan_ranges: rank r owns [r*D//k, (r+1)*D//k), its parts of the blocks it touches, the
    tensors it touches, its element range of each tensor, and which of its blocks it leads."""
    numels = [10, 5, 30, 2, 50, 8]  # D = 105
    blocks = make_blocks(numels, "size:12")  # tensors (0,2) (2,3) (3,6): coordinates [0,15) [15,45) [45,105)
    plan = plan_ranges(blocks, 4, 3)
    assert plan.ranges == ((0, 35), (35, 70), (70, 105)) and list(plan.ranges) == balanced_ranges(105, 3)
    assert plan.block_runs == ((0, 2), (1, 3), (2, 3))
    assert plan.parts == ((15, 20), (10, 25), (35,))
    assert plan.tensor_runs == ((0, 3), (2, 5), (4, 6))
    assert [plan.leads(blocks, r) for r in range(3)] == [[True, True], [False, True], [False]]
    assert plan.tensor_element_ranges(blocks, 1) == [(10, 10), (5, 5), (20, 30), (0, 2), (0, 23), (0, 0)]
    for r, (s, e) in enumerate(plan.ranges):
        assert sum(b - a for a, b in plan.tensor_element_ranges(blocks, r)) == e - s == sum(plan.parts[r])
    assert plan.shard_bytes(blocks, 4, 3) == [3 * (8 + 10), 3 * (5 + 13), 3 * 18]
    # one block (granularity model) serves more workers than blocks; k = 1 is the whole vector
    whole = plan_ranges(make_blocks(numels, "model"), 1, 4)
    assert whole.block_runs == ((0, 1),) * 4 and [sum(p) for p in whole.parts] == [26, 26, 26, 27]
    assert plan_ranges(blocks, 32, 1).parts == (tuple(blocks.sizes),)
    with pytest.raises(ValueError, match="cannot be shared by 106 workers"):
        plan_ranges(blocks, 4, 106)
    with pytest.raises(ValueError, match="world_size"):
        plan_ranges(blocks, 4, 0)


def test_ranges_are_balanced_for_any_layout():
    import random

    rng = random.Random(0)
    for _ in range(200):
        numels = [rng.randint(1, 60) for _ in range(rng.randint(1, 12))]
        blocks = make_blocks(numels, rng.choice(["model", "tensor", "size:40"]))
        k = rng.randint(1, min(9, sum(numels)))
        plan = plan_ranges(blocks, 4, k)
        lengths = [e - s for s, e in plan.ranges]
        assert max(lengths) - min(lengths) <= 1 and sum(lengths) == sum(numels)
        for r, ((l0, l1), part) in enumerate(zip(plan.block_runs, plan.parts)):
            assert len(part) == l1 - l0 and all(m > 0 for m in part) and sum(part) == lengths[r]
