"""benchmarks/comm.py and sharding_speed.py: the records from the ranks' timings and counts,
the fsdp mode's predicted traffic, and the collective counter (pure functions and one
single-rank process group; the --smoke runs of two gloo processes are in test_benchmarks.py)."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.append(str(ROOT / "benchmarks"))  # comm imports its siblings _common and _dist

import comm  # noqa: E402
import sharding_speed  # noqa: E402
from _dist import (  # noqa: E402
    FSDP_TIMED_VARIANTS, TIMED_VARIANTS, CollectiveTiming, DistCounter, Setting, bucket_variant, slowest_rank_times,
)

from twa_ray.planner import planned_fsdp_traffic  # noqa: E402


def rank_result(rank: int, times: dict) -> dict:
    return {"rank": rank, "world_size": 2, "num_params": 1000, "num_blocks": 3, "coords": (600, 400)[rank],
            "padded_length": 600,
            "alternatives_match": rank == 0, "times": times, "buckets": {"0.001": 4}}


def test_a_collective_takes_its_slowest_rank_and_ratios_pair_the_rounds():
    timing = CollectiveTiming(model="mlp", candidates=5, bucket_mb=(0.001,))
    names = [*TIMED_VARIANTS, bucket_variant(0.001, False), bucket_variant(0.001, True)]
    base = {name: [0.02, 0.04, 0.03] for name in names}
    r0 = dict(base, all_reduce_D=[0.010, 0.020, 0.012], twa_step=[0.012, 0.030, 0.018],
              forward_backward=[0.30, 0.32, 0.31], forward_backward_under_all_gather_ring=[0.31, 0.34, 0.31],
              all_gather_ring=[0.02, 0.02, 0.04])
    r1 = dict(base, all_reduce_D=[0.011, 0.019, 0.010], twa_step=[0.013, 0.020, 0.015])
    results = [rank_result(0, r0), rank_result(1, r1)]
    assert slowest_rank_times(results)["all_reduce_D"] == [0.011, 0.020, 0.012]
    records = {r["variant"]: r for r in comm.time_records(timing, results, "smoke")}
    assert set(records) == set(names)
    assert not any(r["alternatives_match"] for r in records.values())  # every rank must agree
    step = records["twa_step"]
    assert step["median_s"] == 0.018
    # per round 0.013/0.011, 0.030/0.020, 0.018/0.012: the median of the ratios
    assert step["ratio_to_all_reduce_D"] == pytest.approx(0.018 / 0.012)
    assert step["meets_target"] is False and step["target_ratio"] == 1.1
    assert step["ratio_to_ar_slice_step"] == pytest.approx(0.65)  # 0.013/0.02, 0.03/0.04, 0.018/0.03
    assert records["all_reduce_D"]["ratio_to_all_reduce_D"] == 1.0
    # float32 payload one rank hands over: reduce-scatter of 2 x 600, 5 x 3 coefficients, all-gather of 600
    assert step["payload_bytes"] == 4 * (1200 + 15 + 600)
    assert records["twa_step_ar_slice"]["payload_bytes"] == 4 * (1000 + 15 + 600)
    assert records["twa_step_all_reduce_only"]["payload_bytes"] == 4 * (2000 + 15)
    # ring: each collective sends every range but one; the most, beside the smallest range (400 of 1000)
    assert records["twa_step_ring"]["payload_bytes"] == 4 * (2 * 600 + 15)
    assert records["reduce_scatter_ring"]["payload_bytes"] == records["all_gather_ring"]["payload_bytes"] == 4 * 600
    # overlap, per round: the all-gather added 0.01, 0.02, 0.0 s to the pass; alone it took 0.02, 0.04, 0.04 s
    # (rank 1's 0.04 and 0.03 are the slower in rounds 2 and 3)
    under = records["forward_backward_under_all_gather_ring"]
    assert under["exposed_all_gather_s"] == pytest.approx(0.01) and under["all_gather_ring_s"] == 0.04
    assert under["hidden_fraction"] == pytest.approx(0.5)  # median of 0.5, 0.5, 1.0
    assert records["forward_backward"]["payload_bytes"] == 0 and under["payload_bytes"] == 4 * 600
    assert records[bucket_variant(0.001, True)]["payload_bytes"] == 4000
    assert "4 buckets of <= 0.001 MB, all in flight" in records[bucket_variant(0.001, True)]["description"]
    table = comm.time_table(list(records.values()))
    assert "twa_step (twa.exchange: sharded) <= 1.1 x all-reduce(D): not met (1.500)" in table
    # gloo's default exchange, marked as such
    assert (step["exchange"], step["default_exchange"]) == ("sharded", False)
    all_reduce_step, ring_step = records["twa_step_all_reduce_only"], records["twa_step_ring"]
    assert (all_reduce_step["exchange"], all_reduce_step["default_exchange"]) == ("all_reduce", False)
    assert (ring_step["exchange"], ring_step["default_exchange"]) == ("ring", True)
    assert "twa_step_ring (twa.exchange: ring, the default here) <= 1.1 x" in table
    assert "overlap: the ring all-gather (40.00 ms alone) added 10.00 ms to a forward and backward pass" in table



def test_fsdp_traffic_is_every_unit_gathered_twice_but_the_root_and_scattered_once():
    # units: the root ("w", 3 values) and "a" (6 x 5 weight, 5 bias); k = 2 pads 3 -> 2 + 2 and 5 -> 3 + 3
    names, shapes = ["w", "a.weight", "a.bias"], [(3,), (6, 5), (5,)]
    padded, root = 2 + 3 * 5 + 3, 2
    plan = planned_fsdp_traffic(names, shapes, 2, 8, 2, "tensor")  # n = 2 candidates, L = 3 blocks
    assert plan["padded_coords"] == padded and plan["units"] == 2
    assert plan["by_op"] == {"all_gather": 4 * (2 * padded - root), "reduce_scatter": 4 * 2 * padded,
                             "all_reduce": 4 * 6}
    assert plan["calls"] == {"all_gather": 3, "reduce_scatter": 2, "all_reduce": 1}
    # ring wire bytes with k = 2: all-gather sends its slice once, reduce-scatter half its input, all-reduce its input
    assert plan["wire"] == 4 * (2 * padded - root) + 4 * padded + 4 * 6
    clipped = planned_fsdp_traffic(names, shapes, 2, 8, 2, "tensor", grad_clip=True)
    assert clipped["by_op"]["all_reduce"] == 4 * 6 + 8 and clipped["calls"]["all_reduce"] == 2
    # four ranks: 3 -> 1, 1, 1, 0 (padded 1); 6 rows of 5 -> 2, 2, 2, 0 (padded 2 x 5); 5 -> 2, 2, 1, 0 (padded 2)
    assert planned_fsdp_traffic(names, shapes, 2, 8, 4, "tensor")["padded_coords"] == 1 + 2 * 5 + 2


def test_fsdp_time_records_carry_their_mode_and_payload():
    timing = CollectiveTiming(model="mlp", candidates=5, bucket_mb=())
    names = ["all_reduce_D", "all_reduce_coef", *FSDP_TIMED_VARIANTS]
    results = [dict(rank_result(r, {name: [0.01, 0.02, 0.03] for name in names}), alternatives_match=None,
                    padded_length=None, fsdp_units=2, fsdp_padded=510, fsdp_root_padded=10) for r in range(2)]
    records = {r["variant"]: r for r in comm.time_records(timing, results, "smoke")}
    assert {v: r["sharding"] for v, r in records.items()} == {
        "all_reduce_D": None, "all_reduce_coef": None, **{v: "fsdp" for v in FSDP_TIMED_VARIANTS}}
    assert all(r["alternatives_match"] is None for r in records.values())  # blocks not timed: nothing checked
    step = records["fsdp_step"]
    # all-gathers of 510 + 500 (the root stays gathered), a reduce-scatter of 2 x 510, 5 x 3 coefficients
    assert step["payload_bytes"] == 4 * (1010 + 1020 + 15)
    assert records["fsdp_step_flat"]["payload_bytes"] == 4 * (510 + 1020 + 15)
    assert step["ratio_to_all_reduce_D"] == 1.0 and step["meets_target"] is True and "ratio_to_twa_step" not in step
    assert "fsdp_step <= 1.1 x all-reduce(D): met (1.000)" in comm.time_table(list(records.values()))


def test_sharding_speed_records_take_the_slowest_worker_and_pair_the_rounds():
    def worker(blocks, fsdp, diff):
        return {"num_params": 100, "step_s": {"blocks": blocks, "fsdp": fsdp},
                "twa_update_s": {"blocks": [0.1, 0.1], "fsdp": [0.2, 0.3]}, "build_s": {"blocks": 1.0, "fsdp": 2.0},
                "param_bytes": {"blocks": 400, "fsdp": 200}, "projection_bytes": {"blocks": 30, "fsdp": 25},
                "first_step_weight_diff": diff, "first_step_weight_change": 0.5, "exchange": "all_reduce"}
    results = [worker([1.0, 2.0], [1.5, 2.0], 1e-8), worker([1.2, 1.0], [1.0, 3.0], 2e-8)]
    blocks, fsdp = sharding_speed.speed_records("m", Setting(steps=2), results, "smoke")
    assert (blocks["sharding"], fsdp["sharding"]) == ("blocks", "fsdp")
    assert (blocks["exchange"], fsdp["exchange"]) == ("all_reduce", None)
    # slowest worker per round: blocks 1.2, 2.0; fsdp 1.5, 3.0 -> ratios 1.25, 1.5
    assert blocks["step_s"] == pytest.approx(1.6) and fsdp["step_s"] == pytest.approx(2.25)
    assert blocks["ratio_fsdp_to_blocks"] == fsdp["ratio_fsdp_to_blocks"] == pytest.approx(1.375)
    assert fsdp["twa_update_s"] == pytest.approx(0.25) and fsdp["param_bytes_per_worker"] == [200, 200]
    assert fsdp["first_step_weight_diff"] == 2e-8


@pytest.mark.filterwarnings("ignore:`torch.distributed.all_gather_into_tensor` is deprecated:FutureWarning")
def test_dist_counter_counts_each_call_once_and_restores_torch_distributed(tmp_path):
    import torch
    import torch.distributed as dist

    originals = {name: getattr(dist, name) for name in DistCounter.FUNCTIONS}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        counter = DistCounter(1)
        with counter:
            dist.all_reduce(torch.zeros(3))  # not counting yet
            counter.counting = True
            dist.all_reduce(torch.zeros(3))
            dist.all_gather_into_tensor(torch.empty(4), torch.zeros(4))  # deprecated: calls all_gather_single
            dist.reduce_scatter_single(torch.empty(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
        dist.all_reduce(torch.zeros(5))  # after the with: not wrapped
    finally:
        dist.destroy_process_group()
    assert {name: getattr(dist, name) for name in DistCounter.FUNCTIONS} == originals
    totals = counter.totals()
    assert totals["by_op"] == {"all_reduce": 12, "all_gather": 16, "reduce_scatter": 16}
    assert totals["calls"] == {"all_reduce": 1, "all_gather": 1, "reduce_scatter": 1}
    assert totals["wire"] == 0  # one rank sends nothing
