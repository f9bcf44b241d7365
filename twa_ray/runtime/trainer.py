"""The one ``TorchTrainer`` builder of every stage (base training, the full budget, TWA), so
that no two stages drift apart in how they ask Ray for workers, GPUs, placement, the
process group's backend, fault tolerance, checkpoints and logging.

    workers = WorkerGroup.of(cfg.twa)               # resolved once: CPUs, GPU, placement
    trainer = torch_trainer(loop, {"cfg": ...}, workers, name=..., storage_path=..., max_failures=...)
    result = trainer.fit()
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .checkpoints import CHECKPOINTS_TO_KEEP
from .ray_env import cluster_has_gpus, default_cpus_per_worker, train_logging_config, worker_runtime_env
from .trainer_trace import traced

DEFAULT_PLACEMENT = "PACK"  # Ray's own default: fill a node first


@dataclass(frozen=True)
class WorkerGroup:
    """The Ray Train workers of one run, resolved: how many, the CPUs each reserves, whether
    each takes one GPU, and how Ray places them (its placement group strategy)."""

    workers: int
    cpus_per_worker: float
    use_gpu: bool
    placement_strategy: str = DEFAULT_PLACEMENT
    fsdp: bool = False  # the section's sharding is "fsdp": its loop needs torch.distributed even on one worker

    @property
    def process_group(self) -> bool:
        """Whether the loop needs a torch.distributed process group: several workers, a GPU
        (NCCL and the device are set up with it) or FSDP. One CPU worker of DDP base training or
        blocks TWA runs every collective as a no-op (``parallel.process_group``) and skips it."""
        return self.workers > 1 or self.use_gpu or self.fsdp

    @classmethod
    def of(cls, section: Any, cpus_per_worker: float | None = None) -> WorkerGroup:
        """The group a config section asks for (``train`` or ``twa``: ``workers``, ``use_gpu``,
        ``cpus_per_worker``, ``placement_strategy``), resolved against the cluster: GPUs when
        ``use_gpu`` is None and the cluster has them; ``cpus_per_worker`` (this argument, else
        the section's) None: ``ray_env.default_cpus_per_worker``. Ray must be initialised."""
        cpus = cpus_per_worker if cpus_per_worker is not None else section.cpus_per_worker
        return cls(
            workers=section.workers,
            cpus_per_worker=cpus if cpus is not None else default_cpus_per_worker(section.workers),
            use_gpu=section.use_gpu if section.use_gpu is not None else cluster_has_gpus(),
            placement_strategy=section.placement_strategy,
            fsdp=getattr(section, "sharding", "blocks") == "fsdp",
        )

    def describe(self) -> str:
        """E.g. "2 worker(s) x 1.0 CPU + 1 GPU", as the drivers log it."""
        return f"{self.workers} worker(s) x {self.cpus_per_worker} CPU{' + 1 GPU' if self.use_gpu else ''}"


def torch_trainer(loop: Callable[[dict], None], loop_config: dict, workers: WorkerGroup, *, name: str,
                  storage_path: str, max_failures: int, callbacks: list | None = None):
    """A ``ray.train.torch.TorchTrainer`` (or, without a process group, its base class
    ``DataParallelTrainer``) running ``loop(loop_config)`` on ``workers``.

    Every stage's run gets the same: one GPU per worker (``use_gpu``) and NCCL, else gloo (no
    process group at all for one CPU worker without FSDP: ``WorkerGroup.process_group``); the
    CPUs and placement of ``workers``; ``FailureConfig(max_failures)``; the latest
    ``checkpoints.CHECKPOINTS_TO_KEEP`` checkpoints kept; the run name ``name`` under
    ``storage_path`` (the same name resumes the run); the workers' runtime env
    (``ray_env.worker_runtime_env``) and Train's logging (``ray_env.train_logging_config``);
    ``callbacks`` (Tune's report callback) in the RunConfig. With ``TWA_RAY_STARTUP_TRACE`` set
    (``benchmarks/startup.py``), ``loop`` runs behind ``trainer_trace.traced_loop``.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    common = dict(
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=workers.workers, use_gpu=workers.use_gpu,
            resources_per_worker={"CPU": workers.cpus_per_worker, **({"GPU": 1} if workers.use_gpu else {})},
            placement_strategy=workers.placement_strategy,
        ),
        run_config=RunConfig(
            name=name, storage_path=storage_path, callbacks=callbacks,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_TO_KEEP),  # the latest: the final one
            worker_runtime_env=worker_runtime_env(), logging_config=train_logging_config(),
        ),
    )
    if workers.process_group:
        return TorchTrainer(traced(loop), torch_config=TorchConfig(backend="nccl" if workers.use_gpu else "gloo"),
                            **common)
    # One CPU worker without FSDP: TorchTrainer's base class, whose no-op backend skips setting up
    # a gloo process group no collective would use (benchmarks/startup.py times both).
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    return DataParallelTrainer(traced(loop), **common)
