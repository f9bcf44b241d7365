"""benchmarks/comm.py --time: the records from the ranks' timings (pure functions; the
--smoke run of two gloo processes is in test_benchmarks.py)."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.append(str(ROOT / "benchmarks"))  # comm imports its siblings _common and _dist

import comm  # noqa: E402
from _dist import TIMED_VARIANTS, CollectiveTiming, bucket_variant, slowest_rank_times  # noqa: E402


def rank_result(rank: int, times: dict) -> dict:
    return {"rank": rank, "world_size": 2, "num_params": 1000, "num_blocks": 3, "coords": 600, "padded_length": 600,
            "alternatives_match": rank == 0, "times": times, "buckets": {"0.001": 4}}


def test_a_collective_takes_its_slowest_rank_and_ratios_pair_the_rounds():
    timing = CollectiveTiming(model="mlp", candidates=5, bucket_mb=(0.001,))
    names = [*TIMED_VARIANTS, bucket_variant(0.001, False), bucket_variant(0.001, True)]
    base = {name: [0.02, 0.04, 0.03] for name in names}
    r0 = dict(base, all_reduce_D=[0.010, 0.020, 0.012], twa_step=[0.012, 0.030, 0.018])
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
    assert records[bucket_variant(0.001, True)]["payload_bytes"] == 4000
    assert "4 buckets of <= 0.001 MB, all in flight" in records[bucket_variant(0.001, True)]["description"]
    assert "twa_step <= 1.1 x all-reduce(D): not met (1.500)" in comm.time_table(list(records.values()))

