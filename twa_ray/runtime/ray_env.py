"""Starting or joining Ray the same way from jobs, tests and notebooks.

- ``RAY_ADDRESS`` set (a cluster, or ``ray job submit``): ``ray.init()`` joins it with
  no resource arguments (passing them to an existing cluster raises).
- Otherwise a local Ray starts bound to 127.0.0.1 only, quiet and lean: no usage
  stats, a 256 MiB object store, the dashboard only when asked (Tune's early stopping
  needs its State API).
- Either way quiet unless ``verbose`` (``quiet_ray``; ``train_logging_config`` for each
  Ray Train run): on a healthy run the console shows this package's lines, not Ray's.
"""
from __future__ import annotations

import logging
import math
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
    # Train's controller polls its workers this often (2 s by default): each stage's fit()
    # returned up to that long after its loop had ended (benchmarks/startup.py).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # The raylet gives its dashboard agent this long to start (about 30 s by default), then
    # aborts the node ("timed out during startup"): on a busy 2-core machine the agent's
    # imports alone took longer (seen 2026-12-07, load ~20). A healthy start is not slowed.
    "RAY_agent_register_timeout_ms": "180000",
}


def prepare_local_env() -> None:
    """Set the environment for a local loopback Ray; call before ``import ray``."""
    if os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
        return
    for key, value in LOCAL_ENV.items():
        os.environ.setdefault(key, value)


# Ray's console switches (Ray 2.60): each removes lines a healthy run printed by the dozen.
QUIET_DRIVER_ENV = {
    # Worker lines reach the console as logged (one format), without "(RayTrainWorker pid=...)".
    "RAY_DISABLE_WORKER_LOG_PREFIX": "1",
    # Tune's legacy console reporter: silent at RunConfig(verbose=0) (tune.sweep). The new
    # one prints its experiment table and paths at any verbosity.
    "RAY_AIR_NEW_OUTPUT": "0",
    # Two trials' progress lines differ only in their numbers: Ray folds them into one
    # "[repeated 2x across cluster]" line plus a paragraph on how to turn that off.
    "RAY_DEDUP_LOGS": "0",
}
QUIET_WORKER_ENV = {
    # The watcher actor only logs node drains, and starting it logs a core_worker.cc error
    # (constructor arguments in the object store with max_restarts > 0) on every run.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}
TRAIN_LOG_LEVEL = "WARNING"
# the placement-group cleaner's warnings a healthy run (or sweep) prints (see quiet_worker)
QUIET_CLEANER_MESSAGES = ("Failed to query Ray Train Controller actor state", "Detected that the Ray Train controller actor")


def quiet_ray(verbose: bool = False) -> dict:
    """Ray's console switches for this process and every Ray worker of the job; returns the
    extra ``ray.init`` arguments (``init_ray`` applies them). ``verbose``: Ray's defaults.

    Call before ``import ray`` (Ray reads the worker-prefix switch at import). Train's own
    INFO lines (worker-group start, one per checkpoint) go with ``train_logging_config``.
    """
    os.environ["TWA_RAY_VERBOSE"] = "1" if verbose else "0"  # train_logging_config in Tune trials

    def pin_cluster_address() -> None:  # runs in every Ray worker process of the job
        import os

        import ray

        trace = os.environ.get("TWA_RAY_STARTUP_TRACE")  # benchmarks/startup.py: runtime.trainer_trace
        if trace:
            import json
            import time

            with open(trace, "a") as f:
                f.write(json.dumps({"event": "process_start", "t": time.time(), "pid": os.getpid()}) + "\n")

        # Ray Train's placement-group cleaner asks the State API with no address; with more
        # than one Ray on the machine (two jobs, or a test's cluster) that lookup raises
        # "Found multiple active Ray instances" and kills its monitor thread. A worker's own
        # cluster is the one to ask.
        if not os.environ.get("RAY_ADDRESS"):
            os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address

    if verbose:
        return {"runtime_env": {"worker_process_setup_hook": pin_cluster_address}}
    for key, value in {**QUIET_DRIVER_ENV, **QUIET_WORKER_ENV}.items():
        os.environ.setdefault(key, value)

    cleaner_messages = QUIET_CLEANER_MESSAGES

    def quiet_worker() -> None:  # runs in every Ray worker process of the job
        import logging
        import os

        import ray

        pin_cluster_address()

        # A local Ray without the dashboard has no State API: the placement-group cleaner
        # warns every second that it cannot reach it; and when Tune stops a trial early
        # (ASHA), it warns that the trial's controller died while removing its placement
        # group, the normal end of a stopped trial. Its other warnings stay.
        logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").addFilter(
            lambda record: not record.getMessage().startswith(cleaner_messages))
        # "Reporting training result ..." (per report, per rank) is logged under the file's
        # path, out of reach of Train's LoggingConfig.
        context = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")
        logging.getLogger(context).setLevel(logging.WARNING)

    # env_vars reach the drivers of Tune trials too, which start Train runs of their own.
    # The hook is a closure, pickled by value: workers need not import twa_ray to run it.
    env_vars = {key: os.environ[key] for key in QUIET_WORKER_ENV}
    return {"runtime_env": {"worker_process_setup_hook": quiet_worker, "env_vars": env_vars}}


def train_logging_config(verbose: bool | None = None):
    """``RunConfig(logging_config=...)`` for Ray Train runs: Train's INFO lines (worker-group
    start, "Checkpoint successfully created" per report) only when verbose. ``None``: as
    ``quiet_ray`` was told in this process (or in the driver that started this Tune trial)."""
    import ray.train

    if verbose is None:
        verbose = os.environ.get("TWA_RAY_VERBOSE") == "1"
    return ray.train.LoggingConfig(log_level="INFO" if verbose else TRAIN_LOG_LEVEL)


def init_ray(num_cpus: int | None = None, dashboard: bool = False, object_store_mb: int = 256,
             verbose: bool | None = None) -> None:
    """Join the cluster in RAY_ADDRESS, or start a local Ray on 127.0.0.1; quiet (``quiet_ray``)
    unless ``verbose``. ``None``: as ``quiet_ray`` was told earlier in this process (a job
    whose stages start Ray), else quiet."""
    prepare_local_env()
    if verbose is None:
        verbose = os.environ.get("TWA_RAY_VERBOSE") == "1"
    quiet = quiet_ray(verbose)
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        log.info("joining the Ray cluster at %s", os.environ["RAY_ADDRESS"])
        ray.init(**quiet)
        return
    log.info("starting a local Ray on 127.0.0.1 (%s CPUs)", num_cpus or os.cpu_count())
    kwargs = {}
    if dashboard:
        # Ray's own actors (Train's placement-group cleaner, which frees the resources of
        # an early-stopped Tune trial) find the State API through this variable; without
        # it they guess, and fail when another Ray runs on the same machine. Set, not
        # defaulted: a value left from an earlier local Ray names a dashboard that is gone.
        from ..parallel.local_ranks import free_port  # here: importing parallel loads torch

        port = free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        kwargs = {"dashboard_host": "127.0.0.1", "dashboard_port": port}
    ray.init(
        # "local": a new Ray even when another runs here; without it ray.init() joins the
        # cluster a `ray start` on this machine last recorded (/tmp/ray/ray_current_cluster)
        address="local",
        num_cpus=num_cpus,
        include_dashboard=dashboard,
        object_store_memory=object_store_mb << 20,
        _node_ip_address="127.0.0.1",
        logging_level=logging.WARNING,
        **kwargs,
        **quiet,
    )


def cluster_gpus() -> float:
    import ray

    return ray.cluster_resources().get("GPU", 0)


def cluster_has_gpus() -> bool:
    return cluster_gpus() > 0


def default_cpus_per_worker(workers: int) -> float:
    """CPUs each of ``workers`` Ray Train workers reserves when the config leaves it open:
    a single node's CPUs shared by the workers (whole CPUs when enough); 1 on a multi-node
    cluster. Base training and TWA use the same rule, so their epochs run on as many
    threads (Ray sets a worker's OMP_NUM_THREADS to its CPUs) and their costs compare."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) != 1:
        return 1.0
    share = nodes[0]["Resources"].get("CPU", 1.0) / workers
    return float(math.floor(share)) if share >= 1 else share


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

    root = str(Path(__file__).resolve().parents[2])  # the folder holding the twa_ray package
    if (os.path.basename(root) in ("site-packages", "dist-packages") or os.path.abspath(os.getcwd()) == root
            or ray.get_runtime_context().runtime_env.get("working_dir")):
        return {}
    paths = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}}
