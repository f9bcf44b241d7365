"""benchmarks/bn_batches.py: the per-K summary as a pure function, and a --smoke run on
synthetic data through the project's training, calibration and evaluation."""
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.append(str(ROOT / "benchmarks"))  # bn_batches imports its sibling _common

import bn_batches  # noqa: E402


def row(k, seed, acc, seconds, batches=1, images=64):
    return {"k": k, "seed": seed, "batches": batches, "images": images, "acc": acc, "seconds": seconds}


def test_summary_per_k_over_the_seeds():
    raw = [row(1, 0, 80.0, 0.1), row(1, 1, 82.0, 0.3), row(1, 2, 81.5, 0.2),
           row("all", 0, 83.0, 1.0, 4, 256), row("all", 1, 83.5, 1.2, 4, 256)]
    one, everything = bn_batches.summarize(raw)
    assert one["k"] == 1 and one["seeds"] == 3 and (one["batches"], one["images"]) == (1, 64)
    assert one["acc_mean"] == pytest.approx(81.1666666, abs=1e-6)
    assert one["acc_std"] == pytest.approx(statistics.stdev([80.0, 82.0, 81.5]), abs=1e-12)  # the sample std
    assert (one["acc_min"], one["acc_max"]) == (80.0, 82.0)
    assert one["mean_abs_diff_to_all"] == pytest.approx((3.25 + 1.25 + 1.75) / 3, abs=1e-12)  # to all's mean 83.25
    assert one["recal_s"] == pytest.approx(0.2) and one["time_ratio_to_all"] == pytest.approx(0.2 / 1.1)
    assert everything["k"] == "all" and everything["time_ratio_to_all"] == 1.0
    (alone,) = bn_batches.summarize([row(5, 0, 80.0, 0.1)])
    assert alone["acc_std"] is None and alone["mean_abs_diff_to_all"] is None and alone["time_ratio_to_all"] is None
    assert "81.17 ±  1.041" in bn_batches.table([one, everything])


def test_k_is_a_positive_count_or_all():
    assert bn_batches.parse_k("all") == "all" and bn_batches.parse_k("50") == 50
    with pytest.raises(Exception):
        bn_batches.parse_k("0")
    args = bn_batches.parse_args([])
    assert args.ks == [1, 5, 10, 20, 50, "all"] and args.seeds == 10 and args.epochs is None  # train.epochs
    assert args.out.endswith("benchmarks/results/bn_batches.jsonl")
    assert bn_batches.parse_args(["--smoke"]).out is None  # smoke and quick runs leave the record alone


def test_smoke_run_on_synthetic_data(tmp_path):
    out = tmp_path / "bn.jsonl"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bn_batches.py"), "--smoke", "--out", str(out), "data.name=synthetic"],
        cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert printed == records
    assert [r["k"] for r in records] == [1, 2, "all"]
    # calibration from 256 training images in batches of 64: 1, 2 and all 4 batches
    assert [(r["batches"], r["images"]) for r in records] == [(1, 64), (2, 128), (4, 256)]
    for r in records:
        assert r["benchmark"] == "bn_batches" and r["mode"] == "smoke" and r["dataset"] == "synthetic"
        assert r["seeds"] == 2 and r["pool_images"] == 256 and r["test_images"] == 128 and r["train_images"] == 256
        assert 0.0 <= r["acc_min"] <= r["acc_mean"] <= r["acc_max"] <= 100.0 and r["recal_s"] > 0
    assert records[-1]["time_ratio_to_all"] == 1.0
    assert "recal s" in proc.stderr  # the table
