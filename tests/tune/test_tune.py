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
twa: {{epochs: 2, bits: 8, workers: 1, cpus_per_worker: {worker_cpus}}}
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


def _write_config(tmp, concurrency, asha, lrs="[0.05, 0.5]", worker_cpus=0.9, extra=""):
    config = tmp / "sweep.yaml"
    config.write_text(SWEEP.format(path=config, out=tmp / "run", concurrency=concurrency, asha=asha, lrs=lrs,
                                   worker_cpus=worker_cpus) + extra)
    return config


def _sweep_cmd(config):
    return [sys.executable, str(ROOT / "jobs" / "tune_twa.py"), "--config", str(config)]


def _run_sweep(config, audit):
    """Run (or resume) the sweep to its end."""
    proc = subprocess.run(_sweep_cmd(config), cwd=ROOT, env=_env(audit), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """The 2 x 2 sweep, ASHA on, two trials at a time, run once. Returns (run folder, audit log);
    the interrupted sweep reuses its candidate store (base training once for the module)."""
    tmp = tmp_path_factory.mktemp("tiny")
    config, audit = _write_config(tmp, 2, "true"), tmp / "audit.log"
    _run_sweep(config, audit)
    return tmp / "run", audit


def test_tiny_sweep_writes_results_and_reads_test_once(tiny_sweep):
    run, audit = tiny_sweep
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


PAUSE_STEP = 5  # 120 training examples / batch 32 = 4 steps an epoch: step 5 is in the second epoch


@pytest.fixture(scope="module")
def interrupted_sweep(tmp_path_factory, tiny_sweep):
    """A sweep of two trials side by side (debug.pause_at_step: the first to reach step
    ``PAUSE_STEP`` stalls there), Ctrl+C'd once: right after one trial ends, while the other
    is paused mid-trial after its first epoch's checkpoint was registered (its "epoch"
    event); then run again to the end. One interruption, both cases: each test checks one.
    The candidates: the tiny sweep's store (the same seed, data, model and train settings).
    Returns (events before the interrupt, all events, result rows, best.json, run folder)."""
    tmp = tmp_path_factory.mktemp("interrupted")
    # two trials at once even on one CPU (0.1 + 0.4 each)
    config = _write_config(tmp, 2, "false", lrs="[0.5]", worker_cpus=0.4,
                           extra=f"store: {tiny_sweep[0] / 'candidates'}\ndebug: {{pause_at_step: {PAUSE_STEP}}}\n")
    audit, run = tmp / "audit.log", tmp / "run"

    def ready(events):
        ended = {t for e, t, _ in events if e == "end"}
        # the other trial: it cannot end while paused, so it is the one that paused
        paused = {t for e, t, _ in events if e == "epoch" and t not in ended}
        return ended and paused and (run / "debug" / f"twa-paused-at-step-{PAUSE_STEP}").exists()

    with open(tmp / "first.err", "w") as err:  # a file, not a pipe: nothing reads it until the end
        first = subprocess.Popen(_sweep_cmd(config), cwd=ROOT, env=_env(audit), stdout=subprocess.DEVNULL,
                                 stderr=err, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and first.poll() is None and not ready(_events(run / "tune_trials.log")):
        time.sleep(0.2)
    assert first.poll() is None, "the sweep ended before it was interrupted: " + (tmp / "first.err").read_text()[-3000:]
    os.killpg(first.pid, signal.SIGINT)  # Ctrl+C: Tune saves the experiment state
    first.wait(timeout=180)
    before = _events(run / "tune_trials.log")

    _run_sweep(config, audit)
    rows = pq.read_table(run / "tune_results.parquet").to_pylist()
    return before, _events(run / "tune_trials.log"), rows, json.loads((run / "best.json").read_text()), run


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


def test_sweep_interrupted_right_after_a_trial_ends_never_trains_it_again(interrupted_sweep):
    before, events, rows, best, run = interrupted_sweep
    _check_trained_once(events, rows, best)
    finished = {t for e, t, _ in before if e == "end"}
    assert finished
    for trial in finished:  # it started exactly one worker group, before the interrupt
        assert [e for e, t, _ in events if t == trial].count("start") == 1
        assert sorted(d for e, t, d in events if t == trial and e == "epoch") == ["0.1", "0.2"]
    records = {t: json.loads((run / "tune_trials" / f"{t}.json").read_text()) for t in finished}
    for row in rows:  # the rows are what the trials trained, restart or not
        if row["trial_id"] in records:
            assert row["final_select_acc"] == records[row["trial_id"]]["history"][-1]["select_acc"]


def test_sweep_interrupted_mid_trial_resumes_it_from_its_checkpoint(interrupted_sweep):
    before, events, rows, best, _ = interrupted_sweep
    _check_trained_once(events, rows, best)
    interrupted = {t for e, t, _ in before if e == "start"} - {t for e, t, _ in before if e == "end"}
    assert len(interrupted) == 1
    (trial,) = interrupted
    mine = [(e, d) for e, t, d in events if t == trial]
    assert [e for e, _ in mine].count("start") == 2  # the worker group started again, once
    assert sorted(d for e, d in mine if e == "epoch") == ["0.1", "0.2"]  # epoch 1 was not trained again
    for other in {t for _, t, _ in events} - interrupted:
        assert [e for e, t, _ in events if t == other].count("start") == 1
