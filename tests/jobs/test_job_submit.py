"""`ray job submit` against a head started on 127.0.0.1, as a cluster user would run the job."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ROOT, ray_subprocess_env
from test_cifar_twa_job import TINY

pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_runs_the_main_job(tmp_path):
    ray_cli = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    env = ray_subprocess_env()
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY.format(path=config, out=tmp_path / "run"))
    gcs, dashboard = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="twajs", dir="/tmp")  # Ray's socket paths must stay short
    # every port of its own: another Ray on the machine must not make the agents fail to bind
    ports = [f"--{flag}={_free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")]
    start = subprocess.run(
        [ray_cli, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", *ports,
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
         "--object-store-memory=268435456", f"--temp-dir={temp_dir}"],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        for _ in range(15):  # the head's job agent comes up a little after `ray start` returns
            submit = subprocess.run(
                [ray_cli, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", str(ROOT),
                 "--", "python", "jobs/cifar_twa.py", "--config", str(config)],
                env=env, capture_output=True, text=True, timeout=600,
            )
            if "No available agent" not in submit.stderr:
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-4000:]
        assert "succeeded" in submit.stdout
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert summary["num_candidates"] == 3
    finally:
        _stop_cluster(temp_dir)


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
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        for pid in _processes_of(temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while _processes_of(temp_dir) and time.time() < deadline:
            time.sleep(0.5)
    shutil.rmtree(temp_dir, ignore_errors=True)
