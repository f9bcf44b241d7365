"""Every benchmark runs (smallest setting, in a subprocess) and prints valid JSON lines.

No timing is asserted: only that each measurement is there, well formed, and that the
exact quantities (bytes, correctness against the dense reference) are right.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_benchmark(name: str, *args: str, timeout: int = 300) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines, f"{name} printed nothing"
    records = [json.loads(line) for line in lines]  # every stdout line is one JSON object
    assert all(r["benchmark"] == name for r in records)
    return records


def test_projection():
    records = run_benchmark("projection", "--smoke", "--threads", "1")
    checks = [r for r in records if r["measure"] == "correctness"]
    assert {r["bits"] for r in checks} == {1, 4, 32}
    assert all(r["check_rel_err"] < 1e-4 for r in checks)
    rows = [r for r in records if r["measure"] == "throughput"]
    assert {(r["op"], r["bits"]) for r in rows} == {(op, b) for op in ("coef_grad", "reconstruct") for b in (1, 4, 32)}
    for r in rows:
        assert r["gbps"] > 0 and r["memcpy_gbps"] > 0 and r["ratio_to_memcpy"] > 0
        assert r["projection_bytes"] == r["n"] * ((r["D"] * r["bits"] + 7) // 8)
        assert r["bytes_ratio_to_ideal"] <= r["target_bytes_ratio"] and r["meets_bytes_target"]
        assert r["bytes_ratio_to_paper"] == pytest.approx(r["bits"] / 8 if r["bits"] < 32 else 1.0, rel=1e-3)
        assert (r["target_ratio_to_memcpy"] == 0.6) == (r["bits"] == 4)


def test_projection_native_kernel():
    records = run_benchmark("projection", "--smoke", "--kernel", "native", "--bits", "2", "4", "--repeats", "1")
    assert all(r["check_rel_err"] < 1e-4 for r in records if r["measure"] == "correctness")


def test_step_overhead():
    (r,) = run_benchmark("step_overhead", "--smoke")
    assert r["sgd_step_s"] > 0 and r["twa_step_s"] > 0 and r["ratio_twa_to_sgd"] > 0
    assert r["target_ratio"] == 1.15 and r["mode"] == "smoke" and r["bits"] == 4 and r["candidates"] == 20
    from twa_ray.core.params import ParamLayout
    from twa_ray.models import build_model

    numels = ParamLayout.from_model(build_model("small_cnn", 10, 3, 8)).numels
    assert r["num_params"] == sum(numels)
    assert r["projection_bytes"] == 20 * sum((m * 4 + 7) // 8 for m in numels)  # one block per tensor, 4 bits


def test_step_overhead_head_stage_setting_is_the_configs_model():
    (r,) = run_benchmark("step_overhead", "--setting", "head_stage", "--batch", "4", "--candidates", "3",
                         "--repeats", "1", "--threads", "1")
    assert (r["setting"], r["model"], r["num_params"], r["image_size"]) == ("head_stage", "small_cnn", 390890, 28)
    assert r["bits"] == 8 and r["target_ratio"] == 1.15 and r["meets_target"] == (r["ratio_twa_to_sgd"] <= 1.15)


def _small_cnn_layout():
    from twa_ray.core.params import ParamLayout
    from twa_ray.models import build_model

    return ParamLayout.from_model(build_model("small_cnn", 10, 3, 8))


def test_comm():
    from twa_ray.core.fsdp_rows import fsdp_padded_numel

    # with gradient clipping: its norm is one more all-reduce (of a float64) in both modes
    records = run_benchmark("comm", "--smoke", "--grad-clip", "0.5")
    assert [(r["sharding"], r["rank"]) for r in records] == [("blocks", 0), ("blocks", 1), ("fsdp", 0), ("fsdp", 1)]
    for r in records[:2]:
        d = r["num_params"]
        assert r["one_all_reduce_payload_bytes"] == 4 * d
        assert r["payload_bytes_per_step"] == r["planned_payload_bytes_per_step"]  # the planner predicts the run
        assert r["wire_bytes_per_step"] == pytest.approx(r["planned_wire_bytes_per_step"])
        assert r["payload_by_op"]["all_reduce"] == 4 * 4 * r["num_blocks"] + 8
        assert r["paper_payload_bytes_per_step"] == 2 * 4 * d and r["paper_payload_ratio"] == 2.0
        assert set(r["payload_by_op"]) == {"reduce_scatter", "all_reduce", "all_gather"}
        assert r["first_step_weight_diff"] <= 1e-4 * r["first_step_weight_change"] + 1e-6  # the same weights
    layout = _small_cnn_layout()
    padded = sum(fsdp_padded_numel(shape, 2) for shape in layout.shapes)
    for r in records[2:]:
        # FSDP2's collectives, counted through torch.distributed, are what the planner's FSDP2 plan predicts
        assert r["matches_plan"] and r["payload_by_op"] == r["planned_payload_by_op"]
        assert r["calls_per_step"] == r["planned_calls_per_step"]
        assert r["payload_bytes_per_step"] == r["planned_payload_bytes_per_step"]
        assert r["wire_bytes_per_step"] == pytest.approx(r["planned_wire_bytes_per_step"])
        # the small CNN's root holds no parameters: every unit gathered in forward and backward, scattered once
        assert r["payload_by_op"] == {"all_gather": 2 * 4 * padded, "reduce_scatter": 2 * 4 * padded,
                                      "all_reduce": 4 * 4 * r["num_blocks"] + 8}  # n = 4, + the squared norm
        assert r["calls_per_step"]["all_gather"] == 2 * r["calls_per_step"]["reduce_scatter"] == 2 * r["fsdp_units"]
        assert r["calls_per_step"]["all_reduce"] == 2
        assert r["twa_payload_bytes_per_step"] == r["payload_by_op"]["all_reduce"]  # TWA's own: the n x L all-reduce
        assert r["num_params"] == layout.num_params and r["coords"] == r["param_bytes"] // 4
        assert r["projection_bytes"] == r["planned_projection_bytes"]


def test_comm_time_smoke():
    sys.path.append(str(ROOT / "benchmarks"))
    from _dist import FSDP_TIMED_VARIANTS, TIMED_VARIANTS, bucket_variant

    from twa_ray.planner import plan_capacity, planned_fsdp_traffic

    records = run_benchmark("comm", "--time", "--smoke")
    by = {r["variant"]: r for r in records}
    assert set(by) == {*TIMED_VARIANTS, *FSDP_TIMED_VARIANTS,
                       *(bucket_variant(mb, a) for mb in (0.01, 0.04) for a in (False, True))}
    assert all(r["measure"] == "time" and r["backend"] == "gloo" and r["workers"] == 2 and r["rounds"] == 2
               and r["median_s"] > 0 and r["alternatives_match"] for r in records)
    assert {v: r["sharding"] for v, r in by.items() if r["sharding"]} == {
        **{v: "blocks" for v in TIMED_VARIANTS if v not in ("all_reduce_D", "all_reduce_coef")},
        **{v: "fsdp" for v in FSDP_TIMED_VARIANTS}}
    assert by["all_reduce_D"]["ratio_to_all_reduce_D"] == 1.0
    layout = _small_cnn_layout()
    numels = layout.numels
    assert by["all_reduce_D"]["payload_bytes"] == 4 * sum(numels) == 4 * by["twa_step"]["num_params"]
    # the timed steps hand the collectives what the planner predicts for a step of each mode
    assert by["twa_step"]["payload_bytes"] == plan_capacity(numels, 4, 4, 2, "tensor").payload["total"]
    fsdp = planned_fsdp_traffic(layout.names, layout.shapes, 4, 4, 2, "tensor")
    assert by["fsdp_step"]["payload_bytes"] == fsdp["payload"]
    assert by["fsdp_step"]["fsdp_units"] == fsdp["units"] and by["fsdp_step"]["ratio_to_twa_step"] > 0
    assert isinstance(by["twa_step"]["meets_target"], bool) and isinstance(by["fsdp_step"]["meets_target"], bool)


def test_sharding_speed_smoke():
    blocks, fsdp = run_benchmark("sharding_speed", "--smoke")
    assert (blocks["sharding"], fsdp["sharding"]) == ("blocks", "fsdp")
    d = _small_cnn_layout().num_params
    for r in (blocks, fsdp):
        assert r["model"] == "small_cnn" and r["mode"] == "smoke" and r["workers"] == 2 and r["rounds"] == 2
        assert r["step_s"] > 0 and r["twa_update_s"] > 0 and r["num_params"] == d
        assert r["ratio_fsdp_to_blocks"] == blocks["ratio_fsdp_to_blocks"] > 0
        # both modes took the same first step
        assert 0 < r["first_step_weight_change"] and r["first_step_weight_diff"] <= 1e-4 * r["first_step_weight_change"]
    assert blocks["param_bytes_per_worker"] == [4 * d, 4 * d]  # a full replica each
    assert sum(fsdp["param_bytes_per_worker"]) == 4 * d  # FSDP2's row shards
    assert (blocks["exchange"], fsdp["exchange"]) == ("ring", None)  # twa.exchange: auto on gloo


def test_scaling():
    one, two = run_benchmark("scaling", "--smoke")
    assert (one["workers"], two["workers"]) == (1, 2)
    # shards add up to the whole, but for a byte per candidate where a range cuts a packed block
    # (balanced ranges, issue 24): at most n x (k - 1) bytes
    assert 0 <= two["projection_bytes_total"] - one["projection_bytes_total"] <= 4 * (2 - 1)  # --smoke: n = 4
    assert two["projection_bytes_per_worker"] == two["planned_projection_bytes_per_worker"]
    assert two["max_over_even_share"] >= 1.0 and two["speedup_over_1_worker"] > 0


def test_sweep_rows_are_the_sweeps_trials_with_the_chosen_one_marked(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"trial_id": "t0", "twa.lr": 0.1, "final_select_acc": 90.0}, {"trial_id": "t1", "twa.lr": 1.0, "final_select_acc": 91.0}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "tune_results.parquet")
    (tmp_path / "best.json").write_text(json.dumps({"trial_id": "t1", "params": {"twa.lr": 1.0}}))
    records = run_benchmark("sweep_rows", str(tmp_path), "--name", "tune_x", "--command", "python -m twa_ray tune ...")
    assert [(r["sweep"], r["trial_id"], r["twa.lr"], r["best"]) for r in records] == [
        ("tune_x", "t0", 0.1, False), ("tune_x", "t1", 1.0, True)]
    assert all(r["command"] == "python -m twa_ray tune ..." and r["machine"]["cores"] for r in records)


def test_quant_error_fidelity_improves_with_bits():
    records = run_benchmark("quant_error", "--smoke")
    assert [r["bits"] for r in records] == [1, 2, 4, 8]
    errs = [r["rel_err"] for r in records]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.02  # 8-bit codes: within 2 % of the direction
    assert records[0]["norm_ratio"] > 2 and abs(records[-1]["norm_ratio"] - 1) < 1e-3 and records[-1]["cosine"] > 0.999


def test_direction_fidelity_of_exact_codes_is_perfect():
    import sys

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from quant_error import direction_fidelity

    # two levels per block: 1-bit min-max codes hold these directions exactly
    u = torch.tensor([[1.0, -1.0, 1.0, 2.0, 2.0, -2.0]])
    assert direction_fidelity(u, [3, 3], 1) == pytest.approx({"norm_ratio": 1.0, "cosine": 1.0, "rel_err": 0.0}, abs=1e-6)


def test_every_record_names_its_commit_and_the_highest_load_of_the_run(monkeypatch):
    """A number carries the commit it was measured at and the highest 1-minute load average
    seen while its benchmark ran, not only the load when the line was written."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import _common

    info = _common.machine()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_common.ROOT, capture_output=True,
                          text=True).stdout.strip()
    assert info["git_commit"].split("+")[0] == head
    assert info["max_load_avg_1m"] >= info["load_avg_1m"]
    watch = _common._LoadWatch(interval_s=3600)
    watch.highest = 0.5
    assert watch.seen(7.25) == 7.25 and watch.seen(1.0) == 7.25 and watch.seen(None) == 7.25
