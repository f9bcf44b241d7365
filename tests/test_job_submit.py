"""`ray job submit` against a head started on 127.0.0.1, as a cluster user would run the job."""
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ray_subprocess_env
from test_cifar_twa_job import TINY

ROOT = Path(__file__).resolve().parents[1]
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
    start = subprocess.run(
        [ray_cli, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
         "--object-store-memory=268435456", f"--temp-dir={tmp_path / 'ray'}"],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        submit = subprocess.run(
            [ray_cli, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir", str(ROOT),
             "--", "python", "jobs/cifar_twa.py", "--config", str(config)],
            env=env, capture_output=True, text=True, timeout=600,
        )
        assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-4000:]
        assert "succeeded" in submit.stdout
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert summary["num_candidates"] == 3
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)
