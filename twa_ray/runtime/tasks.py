"""One-shot Ray tasks: a plain function of the config, run once on one CPU or one GPU.

Test-split evaluation, pretraining, fine-tuning and soup selection each need one process
and no collectives, so they run as Ray tasks rather than a TorchTrainer (whose worker
group costs a start-up per run). A task takes one GPU when the cluster has GPUs, else
one CPU with one torch thread: one task per core is how the cores are used.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch

from ..config import Config, config_from_dict, config_to_dict
from ..output.console import setup_logging
from .ray_env import cluster_cpus, cluster_gpus, worker_runtime_env

log = logging.getLogger(__name__)


def run_task(fn: Callable[..., Any], cfg: Config, *args: Any):
    """Start ``fn(cfg, *args)`` as a Ray task and return its ObjectRef (``ray.get`` it).

    The config travels as a plain dict and is typed again in the task; ``fn`` must be
    importable there (a module-level function of twa_ray).
    """
    import ray

    def task(cfg_dict: dict, *task_args: Any) -> Any:
        setup_logging()
        torch.set_num_threads(1)
        return fn(config_from_dict(cfg_dict), *task_args)

    resources = {"num_gpus": 1} if cluster_gpus() > 0 else {"num_cpus": 1}
    return ray.remote(**resources, runtime_env=worker_runtime_env() or None)(task).remote(config_to_dict(cfg), *args)


def task_device() -> torch.device:
    """The device a task computes on: its GPU when it was given one (``run_task`` asks for
    one when the cluster has GPUs), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def task_slots(cap: int | None = None) -> int:
    """How many ``run_task`` tasks the cluster runs at a time (its GPUs, else its CPUs), at most ``cap``."""
    gpus = cluster_gpus()
    fit = gpus if gpus > 0 else cluster_cpus()
    return max(1, int(min(cap, fit) if cap else fit))


def wait_for_slot(warn_every_s: float = 60.0, poll_s: float = 0.5) -> None:
    """Return once the cluster has a CPU (a GPU, where it has GPUs) free for a ``run_task``.

    While it waits, every ``warn_every_s`` it logs the placement groups that still reserve
    resources: a Ray Train run whose group was never removed (an early-stopped Tune trial
    whose cleaner could not reach the State API) otherwise shows only as a driver that hangs.
    """
    import ray

    key = "GPU" if cluster_gpus() > 0 else "CPU"
    started = warned = time.monotonic()
    while ray.available_resources().get(key, 0.0) < 1.0:
        now = time.monotonic()
        if now - warned >= warn_every_s:
            warned = now
            held = [f"{pg.get('name') or pg_id} ({pg.get('state')}: {list(pg.get('bundles', {}).values())})"
                    for pg_id, pg in ray.util.placement_group_table().items() if pg.get("state") != "REMOVED"]
            log.warning("waited %.0f s for a free %s; placement groups holding resources: %s",
                        now - started, key, "; ".join(held) or "none")
        time.sleep(poll_s)
