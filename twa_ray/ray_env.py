"""Starting or joining Ray the same way from jobs, tests and notebooks.

- ``RAY_ADDRESS`` set (a cluster, or ``ray job submit``): ``ray.init()`` joins it with
  no resource arguments (passing them to an existing cluster raises).
- Otherwise a local Ray starts bound to 127.0.0.1 only, quiet and lean: no usage
  stats, a 256 MiB object store, the dashboard only when asked (Tune's early stopping
  needs its State API).
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

LOCAL_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # else worker prints show twice
    # Ray resolves "127.0.0.1" to the machine's outward address unless it runs as a
    # single-node cluster; this keeps every Ray process (and gloo) on the loopback.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # Token auth guards a cluster others can reach; a loopback-only local Ray is ours.
    "RAY_AUTH_MODE": "disabled",
}


def prepare_local_env() -> None:
    """Set the environment for a local loopback Ray; call before ``import ray``."""
    if os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
        return
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)


def init_ray(num_cpus: int | None = None, dashboard: bool = False, object_store_mb: int = 256) -> None:
    """Join the cluster in RAY_ADDRESS, or start a local Ray on 127.0.0.1."""
    prepare_local_env()
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        log.info("joining the Ray cluster at %s", os.environ["RAY_ADDRESS"])
        ray.init()
        return
    log.info("starting a local Ray on 127.0.0.1 (%s CPUs)", num_cpus or os.cpu_count())
    kwargs = {}
    if dashboard:
        # Ray's own actors (Train's placement-group cleaner, which frees the resources of
        # an early-stopped Tune trial) find the State API through this variable; without
        # it they guess, and fail when another Ray runs on the same machine.
        port = _free_port()
        os.environ.setdefault("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{port}")
        kwargs = {"dashboard_host": "127.0.0.1", "dashboard_port": port}
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=dashboard,
        object_store_memory=object_store_mb << 20,
        _node_ip_address="127.0.0.1",
        logging_level=logging.WARNING,
        **kwargs,
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def cluster_cpus() -> float:
    import ray

    return ray.cluster_resources().get("CPU", 1)


def worker_runtime_env() -> dict:
    """Let Ray workers import twa_ray when the driver found it in a source checkout.

    Ray puts the driver's cwd (or a job's working_dir) on the workers' sys.path; a driver
    started elsewhere (``python /path/to/jobs/x.py``) needs the checkout on PYTHONPATH.
    """
    from pathlib import Path

    import ray

    root = str(Path(__file__).resolve().parents[1])  # the folder holding the twa_ray package
    if (os.path.basename(root) in ("site-packages", "dist-packages") or os.path.abspath(os.getcwd()) == root
            or ray.get_runtime_context().runtime_env.get("working_dir")):
        return {}
    paths = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}}
