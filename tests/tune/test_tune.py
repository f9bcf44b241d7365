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

ROOT = Path(__file__).resolve().parents[2]
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
    twa.lr: {{grid: {lrs}}}
  asha: {{enabled: {asha}, grace_period: 1}}
"""


def _env(audit):
    return ray_subprocess_env(TWA_RAY_TEST_AUDIT=str(audit))


def _write_config(tmp, concurrency, asha, lrs="[0.05, 0.5]"):
    config = tmp / "sweep.yaml"
    config.write_text(SWEEP.format(path=config, out=tmp / "run", concurrency=concurrency, asha=asha, lrs=lrs))
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


def _events(path):
    """(event, trial_id, detail) per line of tune_trials.log."""
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        parts = line.split()
        out.append((parts[1], parts[2], parts[3] if len(parts) > 3 else ""))
    return out


def _interrupt_then_resume(tmp_path, ready, extra=""):
    """Run the sweep until ``ready(events)``, Ctrl+C it, run it again to the end.
    Returns (events before the interrupt, all events, result rows, best.json)."""
    config = _write_config(tmp_path, 1, "false", lrs="[0.5]")  # two trials, one after the other
    config.write_text(config.read_text() + extra)
    audit, run = tmp_path / "audit.log", tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "jobs" / "tune_twa.py"), "--config", str(config)]
    first = subprocess.Popen(cmd, cwd=ROOT, env=_env(audit), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and first.poll() is None and not ready(_events(run / "tune_trials.log"), run):
        time.sleep(0.2)
    assert first.poll() is None, "the sweep ended before it could be interrupted: " + first.stderr.read()[-3000:]
    os.killpg(first.pid, signal.SIGINT)  # Ctrl+C: Tune saves the experiment state
    first.wait(timeout=180)
    before = _events(run / "tune_trials.log")

    proc = subprocess.run(cmd, cwd=ROOT, env=_env(audit), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    rows = pq.read_table(run / "tune_results.parquet").to_pylist()
    return before, _events(run / "tune_trials.log"), rows, json.loads((run / "best.json").read_text())


def _check_trained_once(events, rows, best):
    """Every trial trained each TWA epoch at most once and ended exactly once; one
    completed row per trial, and best.json is the best row."""
    trials = {t for _, t, _ in events}
    assert len(trials) == 2
    for trial in trials:
        ends = [e for e, t, _ in events if t == trial and e == "end"]
        assert len(ends) == 1, (trial, events)
        epochs = [d for e, t, d in events if t == trial and e == "epoch"]
        assert len(epochs) == len(set(epochs)), f"trial {trial} trained an epoch twice: {epochs}"
    assert sorted(r["trial_id"] for r in rows) == sorted(trials)
    assert all(r["status"] == "completed" and r["epochs_run"] == 2 for r in rows)
    top = max(rows, key=lambda r: r["final_select_acc"])
    assert best["trial_id"] == top["trial_id"] and best["selection_metric"] == top["final_select_acc"]
    assert best["params"] == {"twa.candidates": top["twa.candidates"], "twa.lr": top["twa.lr"]}


def test_sweep_interrupted_right_after_a_trial_ends_never_trains_it_again(tmp_path):
    before, events, rows, best = _interrupt_then_resume(
        tmp_path, lambda events, run: any(e == "end" for e, _, _ in events))
    _check_trained_once(events, rows, best)
    finished = {t for e, t, _ in before if e == "end"}
    assert finished
    for trial in finished:  # it started exactly one worker group, before the interrupt
        assert [e for e, t, _ in events if t == trial].count("start") == 1
        assert sorted(d for e, t, d in events if t == trial and e == "epoch") == ["0.1", "0.2"]
    records = {t: json.loads((tmp_path / "run" / "tune_trials" / f"{t}.json").read_text()) for t in finished}
    for row in rows:  # the rows are what the trials trained, restart or not
        if row["trial_id"] in records:
            assert row["final_select_acc"] == records[row["trial_id"]]["history"][-1]["select_acc"]


def test_sweep_interrupted_mid_trial_resumes_it_from_its_checkpoint(tmp_path):
    # 120 training examples / batch 32 = 4 steps an epoch: step 5 is in the second epoch,
    # after the first epoch's checkpoint has been registered (its "epoch" event)
    def paused(events, run):
        return (run / "debug" / "twa-paused-at-step-5").exists() and any(e == "epoch" for e, _, _ in events)

    before, events, rows, best = _interrupt_then_resume(tmp_path, paused, "debug: {pause_at_step: 5}\n")
    _check_trained_once(events, rows, best)
    interrupted = {t for e, t, _ in before if e == "start"} - {t for e, t, _ in before if e == "end"}
    assert len(interrupted) == 1
    (trial,) = interrupted
    mine = [(e, d) for e, t, d in events if t == trial]
    assert [e for e, _ in mine].count("start") == 2  # the worker group started again, once
    assert sorted(d for e, d in mine if e == "epoch") == ["0.1", "0.2"]  # epoch 1 was not trained again
    for other in {t for _, t, _ in events} - interrupted:
        assert [e for e, t, _ in events if t == other].count("start") == 1
