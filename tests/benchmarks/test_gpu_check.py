"""benchmarks/gpu_check.py without a GPU: its argument parsing, the pytest summary it reads,
its summary lines, the exit without CUDA, and a --smoke run of the parts a CPU can run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.append(str(ROOT / "benchmarks"))  # gpu_check imports its siblings

import gpu_check  # noqa: E402


def test_pytest_counts_come_from_the_final_line():
    counts = gpu_check.parse_pytest_counts("s.s\nnote: 5 passed earlier\n3 passed, 1 skipped, 240 deselected in 9.12s\n")
    assert counts == {"passed": 3, "failed": 0, "skipped": 1, "deselected": 240, "errors": 0, "xfailed": 0, "xpassed": 0}
    counts = gpu_check.parse_pytest_counts("F.E\n1 failed, 2 passed, 1 error in 3.0s")
    assert (counts["failed"], counts["passed"], counts["errors"]) == (1, 2, 1)
    assert gpu_check.parse_pytest_counts("==== 2 errors in 1.0s ====")["errors"] == 2
    assert set(gpu_check.parse_pytest_counts("").values()) == {0}


def test_a_skipped_nccl_test_is_reported_as_skipped_with_its_reason():
    """On one GPU the two-rank NCCL test is skipped: the check says so and why, never a plain ok."""
    output = ("..ss\n=========================== short test summary info ============================\n"
              "SKIPPED [2] tests/gpu/test_gpu_cuda.py:152: needs two GPUs: one GPU cannot hold two NCCL ranks\n"
              "18 passed, 2 skipped, 900 deselected in 31.00s\n")
    skips = gpu_check.parse_pytest_skips(output)
    assert skips == [{"count": 2, "where": "tests/gpu/test_gpu_cuda.py:152",
                      "reason": "needs two GPUs: one GPU cannot hold two NCCL ranks"}]
    records = [{"check": "tests", "ok": True, "passed": 18, "failed": 0, "errors": 0, "skipped": 2, "seconds": 31.0,
                "skipped_tests": skips}]
    lines = gpu_check.summary_lines(records)
    assert " skipped " in lines[0] and " ok " not in lines[0]
    assert "skipped 2 at tests/gpu/test_gpu_cuda.py:152: needs two GPUs: one GPU cannot hold two NCCL ranks" in lines[0]
    assert lines[-1] == "all checks that ran passed; 2 test(s) skipped, see above"
    # the reason in the report is the test's own: one place says it
    source = (ROOT / "tests" / "gpu" / "test_gpu_cuda.py").read_text()
    assert 'reason="needs two GPUs: one GPU cannot hold two NCCL ranks"' in source


def test_parts_run_in_the_documented_order_and_smoke_leaves_out_the_quickstart():
    assert gpu_check.parse_args([]).parts == ["tests", "quickstart", "projection", "step"]
    assert gpu_check.parse_args(["--smoke"]).parts == ["tests", "projection", "step"]
    assert gpu_check.parse_args(["--parts", "step,tests"]).parts == ["tests", "step"]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--parts", "tests,benchmarks"])


def test_the_summary_names_each_check_its_numbers_and_the_failures():
    records = [
        {"check": "device", "ok": True, "device": "cuda", "name": "NVIDIA H200", "memory_gib": 139.8, "cuda": "13.0",
         "torch": "2.11.0"},
        {"check": "tests", "ok": True, "passed": 20, "failed": 0, "errors": 0, "skipped": 2, "seconds": 31.0},
        {"check": "quickstart", "ok": False, "error": "TimeoutExpired: timed out after 240 seconds"},
        {"check": "projection", "ok": True, "measure": "device_copy", "gbps": 2150.0},
        {"check": "projection", "ok": True, "measure": "throughput", "kernel": "eager", "op": "coef_grad", "bits": 4,
         "D": 10_000_000, "gbps": 700.0, "ratio_to_memcpy": 0.33, "meets_target": False, "target_ratio": 0.7},
        {"check": "projection", "ok": True, "measure": "throughput", "kernel": "eager", "op": "coef_grad", "bits": 8,
         "D": 10_000_000, "gbps": 900.0, "ratio_to_memcpy": 0.4, "meets_target": None, "target_ratio": None},
        {"check": "step", "ok": True, "model": "resnet18", "batch": 64, "ratio_twa_to_sgd": 1.04, "meets_target": True,
         "target_ratio": 1.1, "sgd_step_s": 0.0123, "twa_step_s": 0.0128},
    ]
    lines = gpu_check.summary_lines(records)
    text = "\n".join(lines)
    assert lines[-1] == "FAILED: quickstart"
    assert "NVIDIA H200, 139.8 GiB, CUDA 13.0" in lines[0]
    assert "20 passed, 2 skipped (31 s)" in lines[1] and " ok " in lines[1]
    assert "FAILED" in lines[2] and "TimeoutExpired" in lines[2]
    assert "device copy 2150 GB/s" in text and "0.33 of copy (not met: >= 0.7)" in text
    assert "8 bits" not in text  # the target is at 4 bits: other widths stay in the JSON lines
    assert "resnet18 batch 64: TWA/SGD 1.04 (met: <= 1.1), SGD 12.3 ms, TWA 12.8 ms" in text
    assert gpu_check.summary_lines(records[:2])[-1] == "all checks passed"


def test_the_quickstart_check_looks_for_what_base_training_logs():
    from twa_ray.runtime.trainer import WorkerGroup

    assert gpu_check.GPU_LOG_MARK in WorkerGroup(1, 1.0, True).describe()  # as base training logs its workers
    assert gpu_check.GPU_LOG_MARK not in WorkerGroup(1, 1.0, False).describe()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_cuda_it_exits_2_and_says_why(tmp_path, capsys):
    out = tmp_path / "gpu_check.jsonl"
    assert gpu_check.main(["--out", str(out)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not out.exists()


def test_smoke_run_writes_the_records_and_prints_the_summary(tmp_path):
    out = tmp_path / "gpu_check.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out)],
                          cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["check"] for r in records[:2]] == ["device", "tests"]
    assert {r["check"] for r in records} == {"device", "tests", "projection", "step"}
    assert all(r["ok"] and r["benchmark"] == "gpu_check" and r["mode"] == "smoke" and r["date"] for r in records)
    tests = records[1]
    assert tests["failed"] == tests["errors"] == 0
    if not torch.cuda.is_available():  # the gpu tests are collected, and skipped
        assert tests["passed"] == 0 and tests["skipped"] > 0
        assert sum(s["count"] for s in tests["skipped_tests"]) == tests["skipped"]  # each with its reason
    rows = [r for r in records if r["check"] == "projection" and r["measure"] == "throughput"]
    assert {(r["op"], r["bits"]) for r in rows} == {(op, b) for op in ("coef_grad", "reconstruct") for b in (1, 4, 32)}
    assert all(r["gbps"] > 0 and r["ratio_to_memcpy"] > 0 and r["check_rel_err"] < 1e-4 for r in rows)
    assert all(r["projection_bytes"] == 4 * ((100_000 * r["bits"] + 7) // 8) for r in rows)  # n = 4, D = 1e5
    (step,) = [r for r in records if r["check"] == "step"]
    assert step["model"] == "small_cnn" and step["ratio_twa_to_sgd"] > 0
    done = "all checks passed" if tests["skipped"] == 0 else f"all checks that ran passed; {tests['skipped']} test(s) skipped"
    assert done in proc.stdout and f"JSON lines: {out}" in proc.stdout
