"""Two Ray nodes on this machine: TWA's two workers on different nodes, reading candidates
from S3 (moto's server), give the coefficients of a one-node run.

The nodes are real ``ray start`` processes (the head with ``--port``, the second with
``--address``), each with its own temp dir, ports and custom resource, as on a cluster.
``ray.cluster_utils.Cluster`` would give separate raylets too, but it starts them from the
test process through Ray's private Node class; ``ray start`` is what users run. Each
``ray start --block`` stays in the foreground, owns its node's processes and stops them
when it gets SIGTERM: the test ends exactly the processes it started (``ray stop`` would
end every Ray on the machine).
"""
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import S3_ENV, free_port, perturbed_store, ray_subprocess_env
from twa_ray.config import config_from_dict
from twa_ray.store import fs as store_fs

pytestmark = pytest.mark.ray

RAY = str(Path(sys.executable).with_name("ray"))
STARTED = "Ray runtime started."
WORKER_CLASS = "RayTrainWorker"


class RayNode:
    """One ``ray start --block`` process on 127.0.0.1 with its own temp dir and ports."""

    def __init__(self, resources: dict, cpus: int, head_port: int | None = None, address: str | None = None):
        self.temp_dir = tempfile.mkdtemp(prefix="twa-node-", dir="/tmp")  # Ray's socket paths must stay short
        cmd = [RAY, "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp_dir}",
               f"--num-cpus={cpus}", "--num-gpus=0", f"--resources={json.dumps(resources)}",
               f"--object-store-memory={100 << 20}", "--disable-usage-stats",
               f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
        if head_port is not None:
            cmd += ["--head", f"--port={head_port}", "--include-dashboard=false",
                    f"--ray-client-server-port={free_port()}"]
        else:
            cmd += [f"--address={address}"]
        # The tests keep Ray single-node (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, conftest): a node
        # joins a cluster only with it on; --node-ip-address keeps every node on the loopback.
        # No drain on SIGTERM (it waits for drain-aware components such as Serve): stop at once.
        env = {**ray_subprocess_env(**S3_ENV), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
               "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
        # its own session: the processes of this node, and none other, form its process group
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.output = self._wait_started(timeout=60)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _wait_started(self, timeout: float) -> str:
        seen, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                break
            seen.append(line)
            if STARTED in line:
                return "".join(seen)
        self.stop()
        raise RuntimeError("ray start did not come up:\n" + "".join(seen)[-3000:])

    def stop(self) -> None:
        """SIGTERM to ``ray start --block``: it stops its node's processes; then whatever of
        its process group is left is killed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _cfg(out: str, placement: str = "PACK"):
    return config_from_dict({
        "name": "nodes", "output_dir": out, "seed": 5,
        "data": {"name": "synthetic", "val_ratio": 0.25, "batch_size": 32,
                 "synthetic": {"num_train": 160, "num_test": 32, "num_classes": 3, "channels": 1, "image_size": 4}},
        "model": {"name": "mlp", "kwargs": {"hidden": [16, 16]}},  # no BatchNorm
        "twa": {"workers": 2, "bits": 4, "granularity": "tensor", "epochs": 2, "lr": 0.2,
                "placement_strategy": placement, "max_failures": 0},
    })


def _worker_nodes(before: set) -> list[str]:
    """The nodes (by their custom resource) of the Train workers started since ``before``."""
    import ray._private.state

    names = {n["NodeID"]: next(r for r in n["Resources"] if r.startswith("node_")) for n in ray.nodes()}
    actors = ray._private.state.actors()
    return sorted(names[a["Address"]["NodeID"]] for i, a in actors.items()
                  if i not in before and a["ActorClassName"] == WORKER_CLASS)


def test_two_workers_on_two_nodes_equal_a_one_node_run(s3_uri, tmp_path, monkeypatch):
    import ray
    import ray._private.state

    from twa_ray.runtime.ray_env import init_ray
    from twa_ray.runtime.twa_train import run_twa

    assert not ray.is_initialized()
    port = free_port()
    nodes = [RayNode({"node_a": 1}, cpus=2, head_port=port)]
    try:
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        init_ray()  # joins the cluster in RAY_ADDRESS, as a job's driver does
        store = perturbed_store(_cfg(str(tmp_path)), store_fs.join(s3_uri, "candidates"))

        before = set(ray._private.state.actors())
        one = run_twa(_cfg(store_fs.join(s3_uri, "one")), store)  # the head is the only node
        assert _worker_nodes(before) == ["node_a", "node_a"]

        nodes.append(RayNode({"node_b": 1}, cpus=1, address=f"127.0.0.1:{port}"))
        deadline = time.monotonic() + 30
        while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        before = set(ray._private.state.actors())
        two = run_twa(_cfg(store_fs.join(s3_uri, "two"), placement="STRICT_SPREAD"), store)
        assert _worker_nodes(before) == ["node_a", "node_b"]
    finally:
        ray.shutdown()
        for node in reversed(nodes):
            node.stop()
    assert len(one.coefficients) == len(two.coefficients) == 1 and one.coefficients[0].abs().sum() > 0
    torch.testing.assert_close(two.coefficients[0], one.coefficients[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(two.weights, one.weights, atol=1e-6, rtol=0)
    assert all(node.proc.returncode is not None for node in nodes)
