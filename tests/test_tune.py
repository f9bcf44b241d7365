"""Ray Tune sweeps over TWA settings, end to end in a subprocess (its own local Ray)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import ray_subprocess_env

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray

SWEEP = """\
# run: python jobs/tune_twa.py --config {path}
output_dir: {out}
seed: 2
data: {{name: synthetic, val_ratio: 0.25, batch_size: 32,
        synthetic: {{num_train: 160, num_test: 64, num_classes: 3, channels: 1, image_size: 4}}}}
model: {{name: mlp, kwargs: {{hidden: [16, 16]}}}}
train: {{epochs: 3, lr: 0.1, schedule: cosine}}
twa: {{epochs: 2, bits: 8, workers: 1, cpus_per_worker: 0.9}}
tune:
  trial_cpus: 0.1
  max_concurrent_trials: {concurrency}
  space:
    twa.candidates: {{grid: ["all", "last:2"]}}
    twa.lr: {{grid: [0.05, 0.5]}}
  asha: {{enabled: {asha}, grace_period: 1}}
"""


def _env(audit):
    return ray_subprocess_env(TWA_RAY_TEST_AUDIT=str(audit))


def _write_config(tmp, concurrency, asha):
    config = tmp / "sweep.yaml"
    config.write_text(SWEEP.format(path=config, out=tmp / "run", concurrency=concurrency, asha=asha))
    return config


def test_tiny_sweep_writes_results_and_reads_test_once(tmp_path):
    config = _write_config(tmp_path, 2, "true")
    audit = tmp_path / "audit.log"
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "tune_twa.py"), "--config", str(config)],
                          cwd=ROOT, env=_env(audit), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    run = tmp_path / "run"
    rows = pq.read_table(run / "tune_results.parquet").to_pylist()
    assert len(rows) == 4
    assert {r["twa.candidates"] for r in rows} == {"all", "last:2"} and {r["twa.lr"] for r in rows} == {0.05, 0.5}
    assert {r["subspace_size"] for r in rows} == {4, 2}  # initial + 3 epochs
    best = json.loads((run / "best.json").read_text())
    completed = [r for r in rows if r["status"] == "completed"]
    top = max(completed, key=lambda r: r["final_select_acc"])
    assert best["selection_metric"] == top["final_select_acc"]
    assert best["params"] == {"twa.candidates": top["twa.candidates"], "twa.lr": top["twa.lr"]}
    assert 0 <= best["test_acc"] <= 100
    assert (run / "plots" / "tune.png").is_file()
    # the test split: unsealed exactly once, for the best trial's final weights
    reads = audit.read_text().splitlines()
    assert len(reads) == 1 and "twa" in reads[0]


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    config = _write_config(tmp_path, 1, "false")
    audit = tmp_path / "audit.log"
    events = tmp_path / "run" / "tune_trials.log"
    cmd = [sys.executable, str(ROOT / "jobs" / "tune_twa.py"), "--config", str(config)]
    first = subprocess.Popen(cmd, cwd=ROOT, env=_env(audit), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        ends = events.read_text().count(" end ") if events.exists() else 0
        if ends >= 2 or first.poll() is not None:
            break
        time.sleep(1)
    assert first.poll() is None, "the sweep ended before it could be interrupted"
    os.killpg(first.pid, signal.SIGINT)  # Ctrl+C: Tune saves the experiment state
    first.wait(timeout=180)
    done_before = {line.split()[2] for line in events.read_text().splitlines() if " end " in line}
    assert 2 <= len(done_before) < 4

    proc = subprocess.run(cmd, cwd=ROOT, env=_env(audit), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    lines = events.read_text().splitlines()
    starts = [line.split()[2] for line in lines if " start " in line]
    ends = [line.split()[2] for line in lines if " end " in line]
    assert sorted(set(ends)) == sorted(ends) and len(ends) == 4  # every trial finished exactly once
    for trial in done_before:
        assert starts.count(trial) == 1  # finished trials were not run again
    rows = pq.read_table(tmp_path / "run" / "tune_results.parquet").to_pylist()
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows)
