"""Base training on Ray Train (data parallel): it saves the candidates TWA averages.

    from twa_ray.config import load_config
    from twa_ray.ray_env import init_ray
    from twa_ray.distributed.base_train import run_base_training

    init_ray()
    result = run_base_training(load_config("configs/quickstart.yaml"))
    print(result.store_uri, result.num_candidates)

The driver (:func:`run_base_training`) launches a ``TorchTrainer`` whose workers run
:func:`train_loop_per_worker`:

- k workers split each seeded global batch (``ShardedBatchSampler``), so k workers see
  exactly the batches one worker would; the local loss is scaled so that DDP's mean
  gradient is the gradient of the global batch's mean loss.
- The learning rate follows ``ScheduleSpec`` over ``train.schedule_epochs`` (the budget)
  while only ``train.epochs`` run: the paper's "first 100 epochs of a 200-epoch schedule".
- Rank 0 writes candidates into the store at ``cfg.store_uri``: the initial weights
  (epoch 0), one per epoch, optionally every ``train.save_every_steps`` steps, all from
  ``train.save_from_epoch`` on. Each carries info {kind, epoch, step, lr, metrics}.
- Every epoch all ranks report metrics; rank 0 attaches a checkpoint (model, optimizer,
  scheduler, epoch, step, metrics history). A restarted worker group (FailureConfig) or
  a re-run with the same run name resumes at the next epoch; candidates already in the
  store (same global step) are not written twice.

Base training reads ``splits.train`` only. ``splits.val`` is evaluated each epoch for
monitoring (val_acc, val_loss); it trains nothing here. The test split is never read.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Subset

from ..config import Config, config_from_dict, config_to_dict
from ..core.schedules import ScheduleSpec, make_optimizer, make_scheduler
from ..builders import model_from_config, splits_from_config
from ..data import DataSplits
from ..evaluation import evaluate
from ..store import CandidateStore
from ..store import fs as store_fs
from .batches import ShardedBatchSampler, batches_per_epoch, loader_for
from .checkpoints import load_ray_checkpoint, ray_checkpoint

log = logging.getLogger(__name__)

STAGE = "base_train"
CHECKPOINTS_TO_KEEP = 2


@dataclass
class BaseTrainResult:
    """What base training left behind.

    Attributes:
        store_uri: the candidate store (absolute path or URI).
        num_candidates: candidates in the store after the run.
        metrics: one dict per epoch run so far (including epochs of earlier, resumed
            attempts): epoch, step, train_loss, train_acc, val_loss, val_acc (when there
            is a val split), lr (of the epoch's last step), time (seconds of the epoch).
        wall_time_s: seconds the driver spent in ``TorchTrainer.fit`` (start-up included).
        run_path: the Ray Train run folder (checkpoints), ``<storage_path>/<run_name>``.
        run_name: the Ray Train run name (deterministic: a re-run resumes it).
    """

    store_uri: str
    num_candidates: int
    metrics: list[dict] = field(default_factory=list)
    wall_time_s: float = 0.0
    run_path: str = ""
    run_name: str = ""


# ---------------------------------------------------------------------------- driver


def run_base_training(
    cfg: Config,
    *,
    epochs: int | None = None,
    store_uri: str | None = None,
    run_name: str | None = None,
    storage_path: str | None = None,
    cpus_per_worker: float | None = None,
) -> BaseTrainResult:
    """Train ``cfg.model`` on ``cfg.data``'s train split with Ray Train and fill the candidate store.

    Args:
        cfg: the run's config (``train``, ``data``, ``model``, ``seed``, ``debug`` sections).
        epochs: epochs to run instead of ``cfg.train.epochs`` (e.g. ``cfg.train.schedule_epochs``
            for a full-budget run); the schedule stays laid out for ``schedule_epochs``.
        store_uri: the candidate store instead of ``cfg.store_uri``.
        run_name: the Ray Train run name instead of ``f"{cfg.name}-base"``. Same name and
            storage: the run resumes from its latest checkpoint.
        storage_path: Ray Train storage instead of ``<cfg.run_dir>/ray``.
        cpus_per_worker: CPUs reserved per worker; default: on a single-node cluster its
            CPUs shared by the workers (whole CPUs when there are enough), else 1.

    Ray must be initialised (``twa_ray.ray_env.init_ray``). Raises ``ConfigError`` for an
    invalid config and Ray's ``TrainingFailedError`` when the workers fail more than
    ``train.max_failures`` times.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from ..ray_env import cluster_has_gpus, worker_runtime_env

    raw = config_to_dict(cfg)
    run_dir = _absolute(cfg.run_dir)
    raw["output_dir"] = run_dir
    raw["store"] = _absolute(store_uri or cfg.store_uri)
    raw["data"]["root"] = _absolute(cfg.data.root)  # workers run in another cwd
    if epochs is not None:
        raw["train"]["epochs"] = epochs
        raw["train"]["budget_epochs"] = cfg.train.schedule_epochs
    config_from_dict(raw, where="run_base_training")  # fail here, not in every worker

    name = run_name or f"{cfg.name}-base"
    storage = _absolute(storage_path or os.path.join(run_dir, "ray"))
    use_gpu = cfg.train.use_gpu if cfg.train.use_gpu is not None else cluster_has_gpus()
    workers = cfg.train.workers
    if cpus_per_worker is None:
        cpus_per_worker = cfg.train.cpus_per_worker
    cpus = cpus_per_worker if cpus_per_worker is not None else _default_cpus_per_worker(workers)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": raw, "run_storage": store_fs.join(storage, name)},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cpus}),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=CHECKPOINTS_TO_KEEP),
            worker_runtime_env=worker_runtime_env(),
        ),
    )
    log.info("base training %s: %d worker(s) x %s CPU%s, %d epochs of a %d-epoch schedule, store %s",
             name, workers, cpus, " + 1 GPU" if use_gpu else "", raw["train"]["epochs"],
             cfg.train.schedule_epochs, raw["store"])
    start = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - start

    history: list[dict] = []
    if result.checkpoint is not None:
        _, info = load_ray_checkpoint(result.checkpoint, with_state=False)
        history = info.get("history", [])
    try:
        num_candidates = len(CandidateStore.open(raw["store"]))
    except FileNotFoundError:
        num_candidates = 0
    log.info("base training %s done in %.1f s: %d candidates in %s", name, wall, num_candidates, raw["store"])
    return BaseTrainResult(raw["store"], num_candidates, history, wall, store_fs.join(storage, name), name)


def run_full_budget_training(cfg: Config, **kwargs: Any) -> BaseTrainResult:
    """Base training for the whole ``train.schedule_epochs`` budget (time-to-accuracy comparison).

    Writes to its own store ``<run_dir>/full_budget_candidates`` and run ``<name>-full-budget``,
    so the candidates of the main run are untouched. ``kwargs`` go to :func:`run_base_training`.
    """
    kwargs.setdefault("store_uri", os.path.join(cfg.run_dir, "full_budget_candidates"))
    kwargs.setdefault("run_name", f"{cfg.name}-full-budget")
    return run_base_training(cfg, epochs=cfg.train.schedule_epochs, **kwargs)


def _absolute(path: str) -> str:
    """Local paths made absolute against the driver's cwd; URIs (s3://...) unchanged."""
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def _default_cpus_per_worker(workers: int) -> float:
    """A single node's CPUs shared by the workers (whole CPUs when enough); 1 on a multi-node cluster."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) != 1:
        return 1.0
    share = nodes[0]["Resources"].get("CPU", 1.0) / workers
    return float(math.floor(share)) if share >= 1 else share


# ---------------------------------------------------------------------------- worker


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker of base training; ``config`` is {"config": config dict, "run_storage": path}."""
    cfg = config_from_dict(config["config"], where="train_loop_config")
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if rank == 0:
        _ensure_worker_logging()
    device = ray.train.torch.get_device()
    tc = cfg.train

    if cfg.data.download and world > 1:  # one download per node, then the others read it
        if ctx.get_local_rank() == 0:
            splits = splits_from_config(cfg)
        _barrier(device)
        if ctx.get_local_rank() != 0:
            splits = splits_from_config(cfg)
    else:
        splits = splits_from_config(cfg)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    net = model_from_config(cfg, splits)
    if cfg.model.sync_bn and world > 1:
        if device.type == "cpu":  # torch's SyncBatchNorm runs on accelerators only
            if rank == 0:
                log.warning("model.sync_bn ignored: SyncBatchNorm needs GPUs; each CPU worker keeps its own batch statistics")
        else:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)

    num_train = len(splits.train)
    drop_last = _drop_last(num_train, cfg.data.batch_size, world)
    steps_per_epoch = batches_per_epoch(num_train, cfg.data.batch_size, drop_last)
    if steps_per_epoch == 0:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} leaves no batch of the {num_train} training images")
    spec = ScheduleSpec(
        kind=tc.schedule, total_steps=tc.schedule_epochs * steps_per_epoch, warmup_frac=tc.warmup,
        milestones=list(tc.milestones), gamma=tc.gamma, final_factor=tc.final_lr_factor, swa_start=tc.swa_start,
    )

    state, info = None, {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state, info = load_ray_checkpoint(checkpoint)
        net.load_state_dict(state["model"])
    start_epoch = int(info.get("epoch", 0)) + 1
    step = int(info.get("step", 0))
    history: list[dict] = list(info.get("history", []))

    model = ray.train.torch.prepare_model(net)  # DDP when world > 1; net stays the unwrapped module
    optimizer = make_optimizer(net.parameters(), tc.optimizer, tc.lr, tc.momentum, tc.weight_decay, tc.nesterov)
    scheduler = make_scheduler(optimizer, spec)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        del state
    criterion = nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing, reduction="sum")

    writer = _CandidateWriter(cfg, net, splits, steps_per_epoch, resumed=checkpoint is not None) if rank == 0 else None
    if rank == 0:
        log.info("rank 0 of %d on %s: %d training images, %d steps/epoch, epochs %d..%d of a %d-epoch schedule",
                 world, device, num_train, steps_per_epoch, start_epoch, tc.epochs, tc.schedule_epochs)
    if writer is not None and tc.save_initial and checkpoint is None:  # resumed: the initial weights are gone
        writer.save(net, kind="initial", step=0, lr=optimizer.param_groups[0]["lr"], metrics={})

    for epoch in range(start_epoch, tc.epochs + 1):
        _maybe_fail(cfg, epoch, rank, world, config["run_storage"])
        started = time.perf_counter()
        torch.manual_seed(cfg.seed * 1_000_003 + epoch * 1_009 + rank)  # augmentation: resumable per epoch
        sampler = ShardedBatchSampler(num_train, cfg.data.batch_size, rank, world, cfg.seed, epoch, drop_last=drop_last)
        loader = loader_for(splits.train, sampler, num_workers=cfg.data.loader_workers, pin_memory=device.type == "cuda")
        model.train()
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, examples (this rank)
        lr = optimizer.param_groups[0]["lr"]
        for (x, y), global_size in zip(loader, sampler.global_sizes):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            lr = optimizer.param_groups[0]["lr"]
            out = model(x)  # (B_local, num_classes)
            loss_sum = criterion(out, y)
            # DDP averages over ranks: world / global_size makes it the global batch's mean loss
            loss = loss_sum * (world / global_size)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip is not None:
                nn.utils.clip_grad_norm_(net.parameters(), tc.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            with torch.no_grad():
                sums[0] += loss_sum.detach()
                sums[1] += (out.argmax(1) == y).sum()
                sums[2] += len(y)
            if (writer is not None and tc.save_every_steps and step % tc.save_every_steps == 0
                    and step != epoch * steps_per_epoch):  # the epoch's end is saved below
                writer.save(net, kind="step", step=step, lr=lr, metrics={"train_loss": float(loss_sum) / max(1, len(y))})

        sums = _all_reduce_sum(sums.cpu())
        metrics = {
            "epoch": epoch,
            "step": step,
            "train_loss": float(sums[0] / sums[2]),
            "train_acc": float(100.0 * sums[1] / sums[2]),
            **_val_metrics(net, splits, rank, world, device, cfg.data.eval_batch_size),
            "lr": lr,
            "time": time.perf_counter() - started,
        }
        history.append(metrics)
        if writer is not None:
            writer.save(net, kind="epoch", step=step, lr=lr, metrics=metrics)
            log.info("epoch %d/%d: loss %.4f, train acc %.2f%%, val acc %s, lr %.5g, %.1f s", epoch, tc.epochs,
                     metrics["train_loss"], metrics["train_acc"],
                     f"{metrics['val_acc']:.2f}%" if "val_acc" in metrics else "-", lr, metrics["time"])
        ckpt_state = None
        if rank == 0:
            ckpt_state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict(), "epoch": epoch, "step": step}
        with ray_checkpoint(ckpt_state, {"epoch": epoch, "step": step, "history": history}) as ckpt:
            ray.train.report(metrics, checkpoint=ckpt)  # every rank, once per epoch


def _drop_last(num_examples: int, batch_size: int, world: int) -> bool:
    """Drop a last global batch so small that a rank would get fewer than 2 examples (BatchNorm)."""
    remainder = num_examples % batch_size
    return 0 < remainder < 2 * world


class _CandidateWriter:
    """Rank 0's writes into the candidate store; skips steps the store already holds (resume)."""

    def __init__(self, cfg: Config, net: nn.Module, splits: DataSplits, steps_per_epoch: int, resumed: bool) -> None:
        meta = {
            "config": config_to_dict(cfg), "stage": STAGE, "model": cfg.model.name, "dataset": cfg.data.name,
            "num_classes": splits.num_classes, "in_channels": splits.in_channels, "image_size": splits.image_size,
        }
        self.store = CandidateStore.create_for_model(cfg.store_uri, net, meta=meta, exist_ok=True)
        self.steps_per_epoch = steps_per_epoch
        self.save_from_epoch = cfg.train.save_from_epoch
        self.saved_steps = {c.info.get("step") for c in self.store.list_candidates()
                            if c.info.get("stage", STAGE) == STAGE}
        later = [s for s in self.saved_steps if isinstance(s, int) and s > 0]
        if not resumed and later:
            log.warning("store %s already holds base-training candidates up to step %d while this run starts "
                        "without a checkpoint: they are kept and those steps are not written again (expected "
                        "when a restarted group replays its first epoch; for a new experiment use a new "
                        "output_dir or store)", self.store.uri, max(later))

    def save(self, net: nn.Module, *, kind: str, step: int, lr: float, metrics: dict) -> None:
        epoch = step / self.steps_per_epoch  # float for candidates inside an epoch
        if epoch < self.save_from_epoch or step in self.saved_steps:
            return
        info = {"stage": STAGE, "kind": kind, "epoch": round(epoch) if kind != "step" else epoch,
                "step": step, "lr": lr, "metrics": metrics}
        index = self.store.append_model(net, info)
        self.saved_steps.add(step)
        log.debug("candidate %d: %s", index, info)


def _val_metrics(net: nn.Module, splits: DataSplits, rank: int, world: int, device, batch_size: int) -> dict:
    """Loss and accuracy on the val split (monitoring only), each rank evaluating every world-th image."""
    if len(splits.val) == 0:
        return {}
    part = Subset(splits.val, list(range(rank, len(splits.val), world)))
    res = evaluate(net, part, device, batch_size=batch_size)
    sums = torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64)
    if res.count:
        sums = torch.tensor([res.loss * res.count, res.accuracy * res.count / 100.0, res.count], dtype=torch.float64)
    sums = _all_reduce_sum(sums)
    return {"val_loss": float(sums[0] / sums[2]), "val_acc": float(100.0 * sums[1] / sums[2])}


def _barrier(device: torch.device) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of a small CPU tensor over ranks (identity without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    if dist.get_backend() == "nccl":
        out = t.to("cuda", torch.float64)
        dist.all_reduce(out)
        return out.cpu()
    dist.all_reduce(t)
    return t


def _maybe_fail(cfg: Config, epoch: int, rank: int, world: int, run_storage: str) -> None:
    """Drills and tests: the last rank raises once at the start of ``debug.fail_at_epoch``.

    A marker file in the run's storage folder makes the failure happen only once, so the
    restarted worker group (FailureConfig) gets past it.
    """
    if cfg.debug.fail_at_epoch != epoch or rank != world - 1:
        return
    loc = store_fs.resolve(run_storage)
    loc.fs.create_dir(loc.path, recursive=True)
    marker = store_fs.join(loc.path, f"debug-failed-at-epoch-{epoch}")
    if store_fs.write_bytes_atomic(loc.fs, marker, b"", overwrite=False):
        raise RuntimeError(f"debug.fail_at_epoch={epoch}: injected failure on rank {rank} (once; marker {marker})")


def _ensure_worker_logging() -> None:
    """Ray worker processes have no INFO handler: give this package's logger one (rank 0 only)."""
    pkg = logging.getLogger("twa_ray")
    if not pkg.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        pkg.addHandler(handler)
        pkg.setLevel(logging.INFO)
        pkg.propagate = False
