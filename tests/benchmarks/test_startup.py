"""benchmarks/startup.py --smoke runs (its own local Ray, in a subprocess) and prints one JSON line
per stage with every start-up part. No timing is asserted: only the fields, their consistency
and that each stage's start-up fits inside its fit()."""
from test_benchmarks import run_benchmark

PARTS = ("controller_s", "worker_actors_s", "process_group_s", "imports_s", "data_s", "store_s", "native_s",
         "resume_s", "first_round_s", "setup_other_s")


def test_startup_smoke():
    records = run_benchmark("startup", "--smoke", timeout=400)
    assert [r["stage"] for r in records] == ["bare", "base", "twa"]
    floor = records[0]["startup_s"]
    assert floor > 0
    for r in records:
        assert r["mode"] == "smoke" and r["workers"] == 1 and r["floor_s"] == floor and r["target_ratio"] == 1.5
        assert all(k in r for k in PARTS)
        assert 0 < r["startup_s"] <= r["fit_s"] and r["compute_s"] >= 0
        assert r["ratio_to_floor"] == round(r["startup_s"] / floor, 2)
        assert r["meets_target"] == (r["ratio_to_floor"] <= 1.5)
        assert "max_load_avg_1m" in r["machine"] and "cores" in r["machine"]
    base, twa = records[1], records[2]
    assert base["imports_s"] > 0 and base["data_s"] > 0  # the loop's module and the data were timed in the worker
    assert twa["imports_s"] > 0 and twa["first_round_s"] > 0 and twa["store_s"] >= 0 and twa["native_s"] >= 0
