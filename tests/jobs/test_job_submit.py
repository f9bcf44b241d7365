"""`ray job submit` against a head started on 127.0.0.1, as a cluster user would run the job:
the README's own commands, with only a tiny test's overrides appended."""
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT, free_port, ray_subprocess_env
from readme_commands import readme_block_with
from twa_ray.config import load_config
from twa_ray.data.from_config import splits_from_config
from twa_ray.runtime.base_loop import candidate_steps, epoch_steps
from twa_ray.store import CandidateStore

pytestmark = pytest.mark.ray

README_ADDRESS = "http://127.0.0.1:8265"  # where the README's head serves job submission
# The quickstart made tiny. quickstart.yaml's candidate settings stay: 20 steps an epoch over
# 160 training images, saved every 16 steps and at each epoch's end.
TINY = ["data.name=synthetic", "data.val_ratio=0.2", "data.batch_size=8",
        "data.synthetic={num_train: 200, num_test: 100, num_classes: 3, channels: 1, image_size: 8}",
        "model.kwargs={widths: [4, 8, 8]}", "train.epochs=2", "train.budget_epochs=4", "compare_full_budget=false"]
# the char-level LM example made tiny: 2 + 2 trials of one TWA epoch over 6 candidates
CHAR_LM_TINY = ["task_args={context: 16, max_chars: 12000, d_model: 16, layers: 1, heads: 2}",
                "data.batch_size=32", "train.epochs=2", "train.budget_epochs=4", "train.save_every_steps=10",
                "tune.space={twa.lr: {grid: [0.1, 1.0]}}", "tune.asha.enabled=false"]
# not uploaded by `--working-dir .` (.gitignore), and nothing a job needs
SKIP_TOP = {".git", ".pytest_cache", ".benchmarks", ".venv", "runs", "data", "tmp"}


def _checkout(dest: Path) -> Path:
    """A copy of the repository: the README's commands run in it as written (``$PWD`` included)."""
    shutil.copytree(ROOT, dest, ignore=lambda d, names: [
        n for n in names if n == "__pycache__" or (Path(d) == ROOT and n in SKIP_TOP)])
    return dest


def _shell(command: str, cwd: Path, env: dict, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """The README's `ray start` head on free ports, in a copy of the checkout: (checkout, env,
    the README's submit command, its block), stopped (only it) at the end."""
    block = readme_block_with("ray job submit")
    exports, start, submit, stop = block
    assert (exports.startswith("export ") and start.startswith("ray start ") and submit.startswith("ray job submit ")
            and stop == "ray stop"), block  # `ray stop` stops every Ray on the machine: _stop_cluster stops ours
    assert README_ADDRESS in submit and "--working-dir ." in submit
    checkout = _checkout(tmp_path_factory.mktemp("head") / "checkout")
    ray_cli = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    env = ray_subprocess_env()
    env["PATH"] = f"{Path(ray_cli).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("TWA_RAY_STORAGE_ROOT", None)
    env.update(item.split("=", 1) for item in exports.split()[1:])
    gcs, dashboard = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="twajs", dir="/tmp")  # Ray's socket paths must stay short
    # every port of its own: another Ray on the machine must not make the agents fail to bind
    ports = [f"--{flag}={free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")]
    submit = submit.replace(README_ADDRESS, f"http://127.0.0.1:{dashboard}")
    try:
        started = _shell(" ".join([start, f"--port={gcs}", *ports, f"--dashboard-port={dashboard}", "--num-cpus=2",
                                   "--object-store-memory=268435456", f"--temp-dir={temp_dir}"]), checkout, env, 180)
        assert started.returncode == 0, started.stdout + started.stderr
        yield checkout, env, submit
    finally:
        _stop_cluster(temp_dir)


def test_readme_ray_job_submit_runs_the_main_job(head):
    checkout, env, submit = head
    # without a storage root the driver (RAY_ADDRESS set by `ray job submit`) refuses at once
    refused = _submit(" ".join([submit, *map(shlex.quote, TINY), "storage_root=null"]), checkout, env)
    assert refused.returncode != 0 and "storage_root" in refused.stdout + refused.stderr
    assert "TWA_RAY_STORAGE_ROOT" in refused.stdout + refused.stderr
    assert not (checkout / "runs").exists()

    done = _submit(" ".join([submit, *map(shlex.quote, TINY)]), checkout, env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "succeeded" in done.stdout
    run = checkout / "runs" / "quickstart"  # under the storage root, not in Ray's copy of the working dir
    summary = json.loads((run / "summary.json").read_text())
    # the candidates base training saved are those the driver counted before it started
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", TINY)
    steps_per_epoch = epoch_steps(len(splits_from_config(cfg).train), cfg.data.batch_size, cfg.train.workers)
    expected = candidate_steps(cfg.train, steps_per_epoch)
    assert expected == [16, 20, 32, 40] and summary["num_candidates"] == 4  # twa.candidates: last:8
    assert [c.info["step"] for c in CandidateStore.open(summary["store"]).list_candidates()] == expected


def test_the_char_lm_examples_tune_sweep_runs_as_a_ray_job(head):
    """Your own task under `ray job submit --working-dir .`: examples/char_lm.py reaches the
    driver and every worker from Ray's copy of the working directory; Tune selects on val
    perplexity, the task's metric, minimised."""
    checkout, env, submit = head
    command = submit.replace("jobs/cifar_twa.py", "jobs/tune_twa.py").replace(
        "configs/quickstart.yaml", "examples/char_lm_tune.yaml")
    assert command != submit and "examples/char_lm_tune.yaml" in command
    done = _submit(" ".join([command, *map(shlex.quote, CHAR_LM_TINY)]), checkout, env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    run = checkout / "runs" / "char_lm_tune"
    best = json.loads((run / "best.json").read_text())
    config = json.loads((run / "config.json").read_text())
    assert (config["tune"]["metric"], config["tune"]["mode"]) == ("select_ppl", "min")
    assert best["test_ppl"] > 1.0 and best["selection_metric"] > 1.0  # perplexities
    assert "test_acc" not in best


def _submit(command: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    for _ in range(15):  # the head's job agent comes up a little after `ray start` returns
        proc = _shell(command, cwd, env, 600)
        if "No available agent" not in proc.stderr:
            return proc
        time.sleep(2)
    return proc


def _processes_of(temp_dir: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and temp_dir.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def _stop_cluster(temp_dir: str) -> None:
    """Stop the processes of this head only (``ray stop`` would stop every Ray on the machine)."""
    for sig, wait in ((signal.SIGTERM, 8), (signal.SIGKILL, 5)):
        for pid in _processes_of(temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while _processes_of(temp_dir) and time.time() < deadline:
            time.sleep(0.5)
    shutil.rmtree(temp_dir, ignore_errors=True)
