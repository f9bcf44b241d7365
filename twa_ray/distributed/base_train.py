"""Base training on Ray Train (data parallel): it saves the candidates TWA averages.

    from twa_ray.config import load_config
    from twa_ray.distributed.ray_env import init_ray
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
- Rank 0 keeps an exponential moving average of the weights, updated after every
  optimizer step (``core.baselines.ema_update_``, timm ModelEmaV3's decay with
  ``baselines.ema_decay`` and ``baselines.ema_warmup``): the EMA baseline.
- ``train.sharding: fsdp``: the workers shard the model with FSDP2 instead of DDP
  replicas, and every rank writes its rows of each candidate, in parallel
  (``base_fsdp``); the store ends up with the same candidates.
- Every epoch all ranks report metrics; rank 0 attaches a checkpoint (model, optimizer,
  scheduler, EMA, epoch, step, metrics history; with ``train.sharding: fsdp`` every rank
  attaches its shards of the model, optimizer and EMA, ``base_fsdp``). A restarted worker group (FailureConfig)
  or a re-run with the same run name resumes at the next epoch, exactly (the EMA too);
  candidates already in the store (same global step) are not written twice.
- The full-budget comparison (:func:`run_full_budget_training`) continues from base
  training's last checkpoint to the end of the schedule and writes no candidates: its
  first epochs are base training's by construction.

Base training reads ``splits.train`` only. ``splits.val`` is evaluated each epoch for
monitoring (val_acc, val_loss); it trains nothing here. The test split is never read.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import Config, TrainConfig, config_from_dict, config_to_dict
from ..core.baselines import ema_decay, ema_update_
from ..core.params import ParamLayout, flatten_state, trainable_parameters
from ..core.schedules import ScheduleSpec, make_optimizer, make_scheduler
from ..data import DataSplits
from ..data.from_config import splits_from_config
from ..models.from_config import model_from_config
from ..output.console import Progress, setup_logging
from ..store import CandidateStore
from ..store import fs as store_fs
from .base_fsdp import RowCandidateWriter, checkpoint_shards, load_checkpoint_shards, loss_scale
from .batches import ShardedBatchSampler, batches_per_epoch, loader_for
from .checkpoint_reads import has_shards, read_shards
from .checkpoints import CHECKPOINTS_TO_KEEP, load_ray_checkpoint
from .fsdp import broadcast_buffers, fsdp_wrap, local_shard
from .worker import all_reduce_sum, evaluate_across_ranks, inject_fault, report, seed_rng, sync_batchnorm

log = logging.getLogger(__name__)

STAGE = "base_train"


@dataclass
class BaseTrainResult:
    """What base training left behind.

    Attributes:
        store_uri: the candidate store (absolute path or URI); None for the full-budget
            continuation, which writes no candidates.
        num_candidates: candidates in the store after the run.
        metrics: one dict per epoch of this stage run so far (including epochs of earlier,
            resumed attempts): epoch, step, train_loss, train_acc, val_loss, val_acc (when
            there is a val split), lr (of the epoch's last step), time (seconds of the
            epoch, its val evaluation included).
        wall_time_s: seconds the driver spent in ``TorchTrainer.fit`` (start-up included;
            0 when the result was reused).
        run_path: the Ray Train run folder (checkpoints), ``<storage_path>/<run_name>``.
        run_name: the Ray Train run name (deterministic: a re-run resumes it).
        checkpoint_path: the last checkpoint (model, optimizer, scheduler, EMA, step), where
            the full budget continues from and the EMA is read (:func:`read_final`); None
            when it cannot be found.
    """

    store_uri: str | None
    num_candidates: int
    metrics: list[dict] = field(default_factory=list)
    wall_time_s: float = 0.0
    run_path: str = ""
    run_name: str = ""
    checkpoint_path: str | None = None

    @property
    def compute_s(self) -> float:
        """Seconds inside the training loop: the sum of the epochs' times in ``metrics``."""
        return float(sum(m.get("time", 0.0) for m in self.metrics))


# ---------------------------------------------------------------------------- driver


def run_base_training(
    cfg: Config,
    *,
    epochs: int | None = None,
    store_uri: str | None = None,
    run_name: str | None = None,
    storage_path: str | None = None,
    cpus_per_worker: float | None = None,
    init_checkpoint: str | None = None,
    write_candidates: bool = True,
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
        init_checkpoint: a base-training checkpoint (path or URI) to continue from when the
            run has none of its own yet.
        write_candidates: False: save no candidates (the full-budget continuation).

    Ray must be initialised (``twa_ray.distributed.ray_env.init_ray``). Raises ``ConfigError`` for an
    invalid config and Ray's ``TrainingFailedError`` when the workers fail more than
    ``train.max_failures`` times.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from .ray_env import cluster_has_gpus, default_cpus_per_worker, train_logging_config, worker_runtime_env

    raw = config_to_dict(cfg)
    run_dir = store_fs.absolute(cfg.run_dir)
    raw["output_dir"] = run_dir
    raw["store"] = store_fs.absolute(store_uri or cfg.store_uri)
    raw["data"]["root"] = store_fs.absolute(cfg.data.root)  # workers run in another cwd
    if epochs is not None:
        raw["train"]["epochs"] = epochs
        raw["train"]["budget_epochs"] = cfg.train.schedule_epochs
    config_from_dict(raw, where="run_base_training")  # fail here, not in every worker

    name = run_name or f"{cfg.name}-base"
    storage = store_fs.absolute(storage_path or store_fs.join(run_dir, "ray"))
    use_gpu = cfg.train.use_gpu if cfg.train.use_gpu is not None else cluster_has_gpus()
    workers = cfg.train.workers
    if cpus_per_worker is None:
        cpus_per_worker = cfg.train.cpus_per_worker
    cpus = cpus_per_worker if cpus_per_worker is not None else default_cpus_per_worker(workers)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": raw, "run_storage": store_fs.join(storage, name),
                           "init_checkpoint": init_checkpoint, "write_candidates": write_candidates},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cpus}),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=CHECKPOINTS_TO_KEEP),
            worker_runtime_env=worker_runtime_env(), logging_config=train_logging_config(),
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
    # Ray gives the path inside the storage filesystem (no scheme): keep it a location
    checkpoint_path = store_fs.location_of(storage, result.checkpoint.path) if result.checkpoint is not None else None
    if not write_candidates:
        log.info("%s done in %.1f s (%d epochs in all)", name, wall, len(history))
        return BaseTrainResult(None, 0, history, wall, store_fs.join(storage, name), name, checkpoint_path)
    try:
        num_candidates = len(CandidateStore.open(raw["store"]))
    except FileNotFoundError:
        num_candidates = 0
    log.info("base training %s done in %.1f s: %d candidates in %s", name, wall, num_candidates, raw["store"])
    return BaseTrainResult(raw["store"], num_candidates, history, wall, store_fs.join(storage, name), name,
                           checkpoint_path)


def run_full_budget_training(cfg: Config, base: BaseTrainResult | None = None, **kwargs: Any) -> BaseTrainResult:
    """The run trained to the end of its schedule (``train.schedule_epochs``): the full-budget comparison.

    It continues ``base``'s last checkpoint (model, optimizer, scheduler, EMA, step; the data
    order and augmentation follow from the epoch), so only the remaining epochs run and the
    first ones are base training's by construction. Without that checkpoint it trains from
    the start (a warning says so). It writes no candidates; its final weights are in the
    result's ``checkpoint_path`` (:func:`read_final`). The result's ``metrics`` are the
    epochs it ran itself. Run ``<name>-full-budget``; ``kwargs`` go to :func:`run_base_training`.
    """
    start = base.checkpoint_path if base is not None else None
    continued_from = int(checkpoint_info(start).get("epoch", 0)) if start is not None else 0
    if start is None:
        log.warning("full budget: no base-training checkpoint to continue from; training all %d epochs from "
                    "the start", cfg.train.schedule_epochs)
    elif continued_from >= cfg.train.schedule_epochs:  # base training already ran the whole budget
        return BaseTrainResult(None, 0, [], 0.0, checkpoint_path=start)
    kwargs.setdefault("run_name", f"{cfg.name}-full-budget")
    full = run_base_training(cfg, epochs=cfg.train.schedule_epochs, init_checkpoint=start, write_candidates=False,
                             **kwargs)
    full.metrics = [m for m in full.metrics if m.get("epoch", 0) > continued_from]
    return full


def checkpoint_info(path: str) -> dict:
    """The JSON info (epoch, step, history) of a base-training checkpoint at ``path`` (a path or URI)."""
    import ray.train

    return load_ray_checkpoint(ray.train.Checkpoint(path), with_state=False)[1]


def latest_checkpoint(run_path: str) -> str | None:
    """The latest checkpoint of the Ray Train run at ``run_path`` (a path or URI); None when
    the run or its checkpoints are gone."""
    import ray.train

    try:
        checkpoint = ray.train.Result.from_path(run_path).checkpoint
    except (RuntimeError, FileNotFoundError, OSError) as exc:
        log.debug("no checkpoint in %s: %s", run_path, exc)
        return None
    return store_fs.location_of(run_path, checkpoint.path) if checkpoint is not None else None


def read_final(checkpoint_path: str, layout: ParamLayout) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weights, EMA) of a base-training checkpoint as (D,) vectors in ``layout`` order (the
    candidates' parameter order); the EMA is None in a checkpoint that holds none. A
    ``train.sharding: fsdp`` checkpoint's are assembled here from every rank's shards."""
    import ray.train

    checkpoint = ray.train.Checkpoint(checkpoint_path)
    if has_shards(checkpoint):  # the model's and EMA's chunks only: not the optimizer's
        shapes = dict(zip(layout.names, layout.shapes))  # what is read and allocated: the model's
        model, ema = read_shards(checkpoint, "model", shapes), read_shards(checkpoint, "ema", shapes)
        ema = flatten_state(ema, layout, source=checkpoint_path) if ema else None
    else:
        state, _ = load_ray_checkpoint(checkpoint)
        model, ema = state["model"], state.get("ema")
    weights = flatten_state(model, layout, source=checkpoint_path)
    return weights, None if ema is None else ema.float()


class _CandidateWriter:
    """Rank 0's writes into the candidate store; skips steps the store already holds (resume)."""

    def __init__(self, cfg: Config, net: nn.Module, splits: DataSplits, steps_per_epoch: int, resumed: bool,
                 run_storage: str) -> None:
        meta = {
            "config": config_to_dict(cfg), "stage": STAGE, "model": cfg.model.name, "dataset": cfg.data.name,
            "num_classes": splits.num_classes, "in_channels": splits.in_channels, "image_size": splits.image_size,
            "base_run": run_storage,  # its last checkpoint: the EMA and where the full budget continues
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

    def info_for(self, *, kind: str, step: int, lr: float, metrics: dict) -> dict | None:
        """The info of the candidate due at ``step``; None when none is (before
        ``save_from_epoch``, or the store already holds that step)."""
        epoch = step / self.steps_per_epoch  # float for candidates inside an epoch
        if epoch < self.save_from_epoch or step in self.saved_steps:
            return None
        return {"stage": STAGE, "kind": kind, "epoch": round(epoch) if kind != "step" else epoch,
                "step": step, "lr": lr, "metrics": metrics}

    def save(self, net: nn.Module, *, kind: str, step: int, lr: float, metrics: dict) -> None:
        info = self.info_for(kind=kind, step=step, lr=lr, metrics=metrics)
        if info is not None:
            self.saved(self.store.append_model(net, info), info)

    def saved(self, index: int, info: dict) -> None:
        """Record that candidate ``index`` with ``info`` is in the store."""
        self.saved_steps.add(info["step"])
        log.debug("candidate %d: %s", index, info)


# ---------------------------------------------------------------------------- worker


@dataclass
class _Trainer:
    """One worker's training set-up and progress (``step``, ``history``)."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    splits: DataSplits
    net: nn.Module  # the plain module (candidates, checkpoints); with FSDP the sharded one
    model: nn.Module  # ``net`` wrapped in DDP when world > 1; with FSDP ``net`` itself
    optimizer: torch.optim.Optimizer
    scheduler: Any
    drop_last: bool
    steps_per_epoch: int
    writer: _CandidateWriter | RowCandidateWriter | None  # rank 0 only; with FSDP every rank
    start_epoch: int
    step: int
    history: list[dict]
    # the EMA of each trainable parameter: rank 0 only; with FSDP every rank, of its rows
    ema: list[torch.Tensor] | None

    @property
    def fsdp(self) -> bool:
        return self.cfg.train.sharding == "fsdp"


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker of base training; ``config`` is {"config": config dict, "run_storage": path}."""
    t = _setup(config)
    tc = t.cfg.train
    if t.writer is not None and tc.save_initial and t.start_epoch == 1:  # a resumed run has no initial weights
        t.writer.save(t.net, kind="initial", step=0, lr=t.optimizer.param_groups[0]["lr"], metrics={})
    progress = Progress("base training", total=tc.epochs, steps_per_unit=t.steps_per_epoch, start=t.start_epoch - 1,
                        logger=log)
    for epoch in range(t.start_epoch, tc.epochs + 1):
        inject_fault("base", "epoch", epoch, t.rank, t.world, config["run_storage"], fail_at=t.cfg.debug.fail_at_epoch)
        metrics = _train_epoch(t, epoch, progress)
        t.history.append(metrics)
        if t.writer is not None:
            t.writer.save(t.net, kind="epoch", step=t.step, lr=metrics["lr"], metrics=metrics)
        if t.writer is not None and t.rank == 0:
            progress.done(epoch - 1, loss=metrics["train_loss"], train_acc=metrics["train_acc"],
                          val_acc=metrics.get("val_acc", "-"), lr=metrics["lr"])
        info = {"epoch": epoch, "step": t.step, "history": t.history}
        if isinstance(t.writer, RowCandidateWriter):  # a collective
            info["candidate_bytes_written"] = t.writer.bytes_by_rank()
        state, sharded = _checkpoint_state(t, epoch)
        report(metrics, state, info, sharded=sharded)  # every rank, once per epoch


def _checkpoint_state(t: _Trainer, epoch: int) -> tuple[dict | None, dict | None]:
    """(rank 0's checkpoint state, None on the other ranks; this rank's sharded state with
    FSDP, else None). ``blocks``: full tensors in the state. FSDP (a collective): every rank's
    shards of the model, optimizer and EMA for DCP, the optimizer's param groups in the state."""
    sharded = None
    if t.fsdp:
        sharded, param_groups = checkpoint_shards(t.net, t.optimizer, t.ema)
        state = {"optimizer_groups": param_groups} if t.rank == 0 else None
    elif t.rank == 0:
        state = {"model": t.net.state_dict(), "optimizer": t.optimizer.state_dict(),
                 "ema": torch.cat([e.reshape(-1) for e in t.ema]).cpu()}
    else:
        state = None
    if state is not None:
        state.update(scheduler=t.scheduler.state_dict(), epoch=epoch, step=t.step)
    return state, sharded


def _setup(config: dict) -> _Trainer:
    """Data, model, optimizer and schedule of this worker, resumed from the latest checkpoint if any."""
    import ray.train
    import ray.train.torch

    cfg = config_from_dict(config["config"], where="train_loop_config")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    setup_logging(rank=rank)  # one narrating rank, every rank warns
    device = ray.train.torch.get_device()
    splits = _load_splits(cfg, ctx.get_local_rank(), world, device)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    net = sync_batchnorm(model_from_config(cfg, splits), cfg.model.sync_bn, device, rank, world)
    num_train, tc = len(splits.train), cfg.train
    drop_last = _drop_last(num_train, cfg.data.batch_size, world)
    steps_per_epoch = batches_per_epoch(num_train, cfg.data.batch_size, drop_last)
    if steps_per_epoch == 0:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} leaves no batch of the {num_train} training images")
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.get("init_checkpoint"):  # the full budget continues base training
        checkpoint = ray.train.Checkpoint(config["init_checkpoint"])
    state, info = load_ray_checkpoint(checkpoint) if checkpoint is not None else (None, {})
    fsdp = tc.sharding == "fsdp"
    if state is not None:
        _check_checkpoint_kind(state, fsdp, checkpoint.path)
    if state is not None and not fsdp:
        net.load_state_dict(state["model"])
    if fsdp:  # a checkpoint's shards are loaded into the sharded model below
        net = model = fsdp_wrap(net.to(device), world, device)
    else:
        model = ray.train.torch.prepare_model(net)  # DDP when world > 1; net stays the unwrapped module
    optimizer = make_optimizer(net.parameters(), tc.optimizer, tc.lr, tc.momentum, tc.weight_decay, tc.nesterov)
    scheduler = make_scheduler(optimizer, ScheduleSpec(
        kind=tc.schedule, total_steps=tc.schedule_epochs * steps_per_epoch, warmup_frac=tc.warmup,
        milestones=tc.milestones, gamma=tc.gamma, final_factor=tc.final_lr_factor, swa_start=tc.swa_start,
        epochs=tc.schedule_epochs,
    ))
    ema = None
    if state is not None and fsdp:  # every rank reads its shards of model, optimizer and EMA (their bytes only)
        ema = load_checkpoint_shards(checkpoint, net, optimizer, state["optimizer_groups"])
    elif state is not None:
        optimizer.load_state_dict(state["optimizer"])
    if state is not None:
        scheduler.load_state_dict(state["scheduler"])
    writer = None
    if rank == 0 and config.get("write_candidates", True):
        writer = _CandidateWriter(cfg, net, splits, steps_per_epoch, checkpoint is not None, config["run_storage"])
    if fsdp and config.get("write_candidates", True):
        _barrier(device)  # rank 0 has created the store
        writer = RowCandidateWriter(writer, cfg.store_uri, rank, world, device)
    if ema is None and (rank == 0 or fsdp):
        ema = _load_ema(net, state)
    start_epoch = int(info.get("epoch", 0)) + 1
    if rank == 0:
        log.info("rank 0 of %d on %s: %d training images, %d steps/epoch, epochs %d..%d of a %d-epoch schedule",
                 world, device, num_train, steps_per_epoch, start_epoch, tc.epochs, tc.schedule_epochs)
    return _Trainer(cfg, rank, world, device, splits, net, model, optimizer, scheduler, drop_last, steps_per_epoch,
                    writer, start_epoch, int(info.get("step", 0)), list(info.get("history", [])), ema)


def _check_checkpoint_kind(state: dict, fsdp: bool, path: str) -> None:
    """A ValueError when the checkpoint at ``path`` was made with the other ``train.sharding``."""
    if fsdp and "optimizer_groups" not in state:
        raise ValueError(f"checkpoint {path} holds full tensors (train.sharding: blocks, or an fsdp run of an older "
                         "version); train.sharding: fsdp resumes from sharded checkpoints only")
    if not fsdp and "model" not in state:
        raise ValueError(f"checkpoint {path} holds sharded state (train.sharding: fsdp); train.sharding: blocks "
                         "cannot resume from it")


def _load_ema(net: nn.Module, state: dict | None) -> list[torch.Tensor]:
    """The EMA of each trainable parameter of ``net`` (with FSDP its local part): a ``blocks``
    checkpoint's, or a copy of the weights (the first update overwrites it: its decay is 0)."""
    params = trainable_parameters(net)
    if state is not None and state.get("ema") is not None:
        flat = state["ema"]
        return [v.view(p.shape).to(p.device, copy=True)
                for v, p in zip(flat.split([p.numel() for p in params]), params)]
    if state is not None:
        log.warning("the checkpoint holds no EMA of the weights (made by an older version): the EMA restarts "
                    "from its weights")
    return [local_shard(p).detach().clone() for p in params]


def _load_splits(cfg: Config, local_rank: int, world: int, device: torch.device) -> DataSplits:
    """The data splits; with ``data.download``, one download per node, then the others read it."""
    if not (cfg.data.download and world > 1):
        return splits_from_config(cfg)
    if local_rank == 0:
        splits = splits_from_config(cfg)
    _barrier(device)
    return splits if local_rank == 0 else splits_from_config(cfg)


def _train_epoch(t: _Trainer, epoch: int, progress: Progress) -> dict:
    """One epoch of data-parallel SGD; its metrics (train loss and accuracy over all ranks, val, lr, time)."""
    tc, started = t.cfg.train, time.perf_counter()
    seed_rng(t.cfg.seed, epoch, t.rank)  # augmentation: resumable per epoch
    sampler = ShardedBatchSampler(len(t.splits.train), t.cfg.data.batch_size, t.rank, t.world, t.cfg.seed, epoch,
                                  drop_last=t.drop_last)
    loader = loader_for(t.splits.train, sampler, num_workers=t.cfg.data.loader_workers,
                        pin_memory=t.device.type == "cuda")
    criterion = nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing, reduction="sum")
    t.model.train()
    sums = torch.zeros(3, dtype=torch.float64, device=t.device)  # loss sum, correct, examples (this rank)
    lr = t.optimizer.param_groups[0]["lr"]
    for (x, y), global_size in zip(loader, sampler.global_sizes):
        x, y = x.to(t.device, non_blocking=True), y.to(t.device, non_blocking=True)
        lr = t.optimizer.param_groups[0]["lr"]
        if t.fsdp:
            broadcast_buffers(t.net)  # rank 0's BatchNorm statistics, as DDP does
        out = t.model(x)  # (B_local, num_classes)
        loss_sum = criterion(out, y)
        loss = loss_sum * loss_scale(tc.sharding, t.world, global_size)  # the global batch's mean loss
        t.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip is not None:
            nn.utils.clip_grad_norm_(t.net.parameters(), tc.grad_clip)
        t.optimizer.step()
        t.scheduler.step()
        if t.ema is not None:
            b = t.cfg.baselines
            ema_update_(t.ema, [local_shard(p) for p in trainable_parameters(t.net)],
                        ema_decay(t.step, b.ema_decay, b.ema_warmup))
        t.step += 1
        progress.step(epoch - 1, t.step - (epoch - 1) * t.steps_per_epoch)  # a line now and then on long epochs
        with torch.no_grad():
            sums[0] += loss_sum.detach()
            sums[1] += (out.argmax(1) == y).sum()
            sums[2] += len(y)
        if (t.writer is not None and tc.save_every_steps and t.step % tc.save_every_steps == 0
                and t.step != epoch * t.steps_per_epoch):  # the epoch's end is saved by the caller
            t.writer.save(t.net, kind="step", step=t.step, lr=lr, metrics={"train_loss": float(loss_sum.detach()) / max(1, len(y))})
    sums = all_reduce_sum(sums, t.device).cpu()
    return {
        "epoch": epoch, "step": t.step,
        "train_loss": float(sums[0] / sums[2]), "train_acc": float(100.0 * sums[1] / sums[2]),
        **_val_metrics(t), "lr": lr, "time": time.perf_counter() - started,
    }


def _val_metrics(t: _Trainer) -> dict:
    """Loss and accuracy on the val split (monitoring only), shared across ranks."""
    if len(t.splits.val) == 0:
        return {}
    res = evaluate_across_ranks(t.net, t.splits.val, t.rank, t.world, t.device, t.cfg.data.eval_batch_size,
                                lockstep=t.fsdp)
    return {"val_loss": res.loss, "val_acc": res.accuracy}


def _drop_last(num_examples: int, batch_size: int, world: int) -> bool:
    """Drop a last global batch so small that a rank would get fewer than 2 examples (BatchNorm)."""
    remainder = num_examples % batch_size
    return 0 < remainder < 2 * world


def epoch_steps(num_train: int, batch_size: int, workers: int) -> int:
    """Optimizer steps of a base-training epoch over ``num_train`` examples on ``workers`` ranks."""
    return batches_per_epoch(num_train, batch_size, _drop_last(num_train, batch_size, workers))


def candidate_steps(train: TrainConfig, steps_per_epoch: int) -> list[int]:
    """The global steps, sorted, at which a complete base training saves a candidate (as
    ``train_loop_per_worker`` and ``_CandidateWriter`` do): 0 with ``save_initial``, each
    epoch's end, every ``save_every_steps`` steps, all from epoch ``save_from_epoch`` on."""
    last = train.epochs * steps_per_epoch
    steps = {epoch * steps_per_epoch for epoch in range(1, train.epochs + 1)}
    if train.save_initial:
        steps.add(0)
    if train.save_every_steps:
        steps.update(range(train.save_every_steps, last + 1, train.save_every_steps))
    return sorted(s for s in steps if s / steps_per_epoch >= train.save_from_epoch)


def _barrier(device: torch.device) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if device.type == "cuda":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()
