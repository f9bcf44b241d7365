"""Base training's Ray Train worker loop (``run_base_training`` launches it): data-parallel
SGD on the train split, candidates into the store, the EMA of the weights, a checkpoint every
epoch, exact resume. How the workers share the model (DDP replicas or FSDP2 shards) is the
``train.sharding`` mode's (``parallel.sharding``): the loop calls it and never asks which it is.
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import Config, TrainConfig, config_from_dict
from ..core.baselines import ema_decay, ema_update_
from ..core.params import trainable_parameters
from ..core.schedules import ScheduleSpec, make_compressed_scheduler, make_optimizer, make_scheduler
from ..tasks import Task, TaskData, Totals, loss_and_sums, model_spec, task_data, task_from_config, to_device
from ..output.console import Progress, setup_logging
from ..parallel.batches import ShardedBatchSampler, batches_per_epoch, loader_for, local_slice
from ..parallel.evaluate import evaluate_across_ranks
from ..parallel.process_group import all_reduce_sum, barrier
from ..parallel.sharding import ShardingMode, sharding_mode
from ..parallel.sharding.candidates import CandidateWriter
from ..parallel.sharding.fsdp_tensors import local_shard
from .checkpoint_reads import load_shards
from .checkpoints import load_ray_checkpoint
from .worker import inject_fault, report, seed_rng, sync_batchnorm

log = logging.getLogger(__name__)


@dataclass
class _Trainer:
    """One worker's training set-up and progress (``step``, ``history``)."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    task: Task  # cfg.task, with train.label_smoothing
    data: TaskData  # test sealed
    mode: ShardingMode  # train.sharding
    net: nn.Module  # the plain module (candidates, checkpoints); with FSDP the sharded one
    model: nn.Module  # ``net`` wrapped in DDP when world > 1; with FSDP ``net`` itself
    optimizer: torch.optim.Optimizer
    scheduler: Any
    drop_last: bool
    steps_per_epoch: int
    writer: Any  # the mode's candidate writer: rank 0 only; with FSDP every rank
    start_epoch: int
    step: int
    history: list[dict]
    # the EMA of each trainable parameter: rank 0 only; with FSDP every rank, of its rows
    ema: list[torch.Tensor] | None


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker of base training; ``config`` is {"config": config dict, "run_storage": path}."""
    t = _setup(config)
    tc = t.cfg.train
    if t.writer is not None and tc.save_initial and t.start_epoch == 1:  # a resumed run has no initial weights
        t.writer.save(t.net, kind="initial", step=0, lr=t.optimizer.param_groups[0]["lr"], metrics={},
                      weights=_candidate_weights(t))
    last = _last_epoch(config, tc)
    progress = Progress("base training", total=last, steps_per_unit=t.steps_per_epoch, start=t.start_epoch - 1,
                        logger=log)
    for epoch in range(t.start_epoch, last + 1):
        inject_fault("base", "epoch", epoch, t.rank, t.world, config["run_storage"], fail_at=t.cfg.debug.fail_at_epoch)
        metrics = _train_epoch(t, epoch, progress)
        t.history.append(metrics)
        if t.writer is not None:
            t.writer.save(t.net, kind="epoch", step=t.step, lr=metrics["lr"], metrics=metrics,
                          weights=_candidate_weights(t))
        if t.writer is not None and t.rank == 0:
            shown = (f"train_{t.task.metric}", f"val_{t.task.metric}")  # those the epoch measured
            progress.done(epoch - 1, loss=metrics["train_loss"], **{k: metrics[k] for k in shown if k in metrics},
                          lr=metrics["lr"])
        info = {"epoch": epoch, "step": t.step, "history": t.history}
        if t.writer is not None:
            info.update(t.writer.checkpoint_info())  # with FSDP a collective: every rank has a writer
        state, sharded = _checkpoint_state(t, epoch)
        report(metrics, state, info, sharded=sharded)  # every rank, once per epoch


def _candidate_weights(t: _Trainer) -> list[torch.Tensor] | None:
    """What a candidate saves instead of the weights: the EMA's (``train.candidates_from: ema``,
    updated after the same step), or None: the weights themselves."""
    return t.ema if t.cfg.train.candidates_from == "ema" else None


def _checkpoint_state(t: _Trainer, epoch: int) -> tuple[dict | None, dict | None]:
    """(rank 0's checkpoint state, None on the other ranks; this rank's sharded state, or None):
    the mode's (``ShardingMode.training_checkpoint``, a collective), with the scheduler and
    the position."""
    state, sharded = t.mode.training_checkpoint(t.net, t.optimizer, t.ema, t.rank)
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
    task, data = _load_data(cfg, ctx.get_local_rank(), world, device)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    net = sync_batchnorm(task.build_model(), cfg.model.sync_bn, device, rank, world)
    num_train, tc = len(data.train), cfg.train
    drop_last = _drop_last(num_train, cfg.data.batch_size, world)
    steps_per_epoch = batches_per_epoch(num_train, cfg.data.batch_size, drop_last)
    if steps_per_epoch == 0:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} leaves no batch of the {num_train} training images")
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.get("init_checkpoint"):  # the full budget continues base training
        checkpoint = ray.train.Checkpoint(config["init_checkpoint"])
    state, info = load_ray_checkpoint(checkpoint) if checkpoint is not None else (None, {})
    mode = sharding_mode(tc.sharding, "train.sharding")
    if state is not None:
        mode.check_checkpoint(state, checkpoint.path)
    net, model = mode.wrap_for_training(net, world, device, ray.train.torch.prepare_model, state)
    optimizer = make_optimizer(net.parameters(), tc.optimizer, tc.lr, tc.momentum, tc.weight_decay, tc.nesterov)
    spec = ScheduleSpec(
        kind=tc.schedule, total_steps=tc.schedule_epochs * steps_per_epoch, warmup_frac=tc.warmup,
        milestones=tc.milestones, gamma=tc.gamma, final_factor=tc.final_lr_factor, swa_start=tc.swa_start,
        epochs=tc.schedule_epochs,
    )
    compress = config.get("compress")  # SGD at equal compute: {"start_step", "epochs"} of its continuation
    scheduler = (make_scheduler(optimizer, spec) if not compress else make_compressed_scheduler(
        optimizer, spec, int(compress["start_step"]), int(compress["epochs"]) * steps_per_epoch))
    load = functools.partial(load_shards, checkpoint) if checkpoint is not None else None
    ema = mode.load_training(net, optimizer, state, rank, load)
    if state is not None and compress and ray.train.get_checkpoint() is None:
        # the continuation starts from base training's checkpoint: its own schedule, from its first lr
        # (loading base training's optimizer brought back base training's last one)
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
    elif state is not None:
        scheduler.load_state_dict(state["scheduler"])
    writer = None
    if config.get("write_candidates", True):  # rank 0's decides what is saved; the mode's writes it
        writer = None if rank != 0 else CandidateWriter(cfg, net, model_spec(cfg, task), steps_per_epoch, checkpoint is not None,
                                                        config["run_storage"])
        writer = mode.candidate_writer(writer, cfg.store_uri, rank, world, device)
    start_epoch = int(info.get("epoch", 0)) + 1
    if rank == 0:
        log.info("rank 0 of %d on %s: %d training examples, %d steps/epoch, epochs %d..%d of a %d-epoch schedule",
                 world, device, num_train, steps_per_epoch, start_epoch, _last_epoch(config, tc), tc.schedule_epochs)
    return _Trainer(cfg, rank, world, device, task, data, mode, net, model, optimizer, scheduler, drop_last,
                    steps_per_epoch, writer, start_epoch, int(info.get("step", 0)), list(info.get("history", [])), ema)


def _last_epoch(config: dict, tc: TrainConfig) -> int:
    """The last epoch to run: ``train.epochs``, or SGD at equal compute's own (``compress``)."""
    compress = config.get("compress")
    return tc.epochs if not compress else int(compress["from_epoch"]) + int(compress["epochs"])


def _load_data(cfg: Config, local_rank: int, world: int, device: torch.device) -> tuple[Task, TaskData]:
    """The task and its data (test sealed); with ``data.download``, one download per node,
    then the others read it."""
    task = task_from_config(cfg, "train")
    if not (cfg.data.download and world > 1):
        return task, task_data(task)
    if local_rank == 0:
        data = task_data(task)
    barrier(device)
    return task, (data if local_rank == 0 else task_data(task))


def _train_epoch(t: _Trainer, epoch: int, progress: Progress) -> dict:
    """One epoch of data-parallel SGD; its metrics (train loss and accuracy over all ranks, val, lr, time)."""
    tc, started = t.cfg.train, time.perf_counter()
    seed_rng(t.cfg.seed, epoch, t.rank)  # augmentation: resumable per epoch
    sampler = ShardedBatchSampler(len(t.data.train), t.cfg.data.batch_size, t.rank, t.world, t.cfg.seed, epoch,
                                  drop_last=t.drop_last)
    loader = loader_for(t.data.train, sampler, num_workers=t.cfg.data.loader_workers,
                        pin_memory=t.device.type == "cuda", collate_fn=t.data.collate_fn)
    t.model.train()
    loss_total = torch.zeros(2, dtype=torch.float64, device=t.device)  # loss sum, examples (this rank)
    totals = Totals()  # the task's metric sums of the training batches (this rank)
    lr = t.optimizer.param_groups[0]["lr"]
    for batch, global_size in zip(loader, sampler.global_sizes):
        batch = to_device(batch, t.device, non_blocking=True)
        local = local_slice(global_size, t.rank, t.world)
        local_size = local[1] - local[0]
        lr = t.optimizer.param_groups[0]["lr"]
        t.mode.before_forward(t.net)  # FSDP: rank 0's BatchNorm statistics, as DDP does
        loss_sum, batch_sums = loss_and_sums(t.task, t.model, batch)  # summed over the local_size examples
        loss = loss_sum * t.mode.loss_scale(t.world, global_size)  # the global batch's mean loss
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
        loss_total[0] += loss_sum.detach()
        loss_total[1] += local_size
        totals.add(batch_sums)
        if (t.writer is not None and tc.save_every_steps and t.step % tc.save_every_steps == 0
                and t.step != epoch * t.steps_per_epoch):  # the epoch's end is saved by the caller
            t.writer.save(t.net, kind="step", step=t.step, lr=lr,
                          metrics={"train_loss": float(loss_sum.detach()) / max(1, local_size)},
                          weights=_candidate_weights(t))
    return {
        "epoch": epoch, "step": t.step, **_train_metrics(t, loss_total, totals),
        **_val_metrics(t), "lr": lr, "time": time.perf_counter() - started,
    }


def _train_metrics(t: _Trainer, loss_total: torch.Tensor, totals: Totals) -> dict:
    """train_loss (the mean training loss), train_examples (the epoch's examples) and
    train_<name> of the metric sums the task's loss gave, over all ranks (a collective)."""
    names = sorted(totals.sums)  # the same on every rank: a task's batches share their names
    reduced = all_reduce_sum(torch.cat([loss_total.cpu(), totals.as_tensor(names)]).to(t.device), t.device).cpu()
    out = {"train_loss": float(reduced[0] / reduced[1]), "train_examples": int(reduced[1])}
    summary = t.task.summarize(Totals.from_tensor(names, reduced[2:])) if names else {}
    out.update({f"train_{k}": v for k, v in summary.items() if k != "loss"})
    return out


def _val_metrics(t: _Trainer) -> dict:
    """val_<name> of each of the task's metrics on the val split (monitoring only), shared across ranks."""
    if len(t.data.val) == 0:
        return {}
    res = evaluate_across_ranks(t.net, t.data.val, t.task, t.rank, t.world, t.device, t.cfg.data.eval_batch_size,
                                lockstep=t.mode.lockstep, collate_fn=t.data.collate_fn)
    return {f"val_{k}": v for k, v in res.metrics.items()}


def _drop_last(num_examples: int, batch_size: int, world: int) -> bool:
    """Drop a last global batch so small that a rank would get fewer than 2 examples (BatchNorm)."""
    remainder = num_examples % batch_size
    return 0 < remainder < 2 * world


def epoch_steps(num_train: int, batch_size: int, workers: int) -> int:
    """Optimizer steps of a base-training epoch over ``num_train`` examples on ``workers`` ranks."""
    return batches_per_epoch(num_train, batch_size, _drop_last(num_train, batch_size, workers))


def candidate_steps(train: TrainConfig, steps_per_epoch: int) -> list[int]:
    """The global steps, sorted, at which a complete base training saves a candidate (as
    ``train_loop_per_worker`` and ``parallel.sharding.candidates.CandidateWriter`` do): 0 with ``save_initial``, each
    epoch's end, every ``save_every_steps`` steps, all from epoch ``save_from_epoch`` on."""
    last = train.epochs * steps_per_epoch
    steps = {epoch * steps_per_epoch for epoch in range(1, train.epochs + 1)}
    if train.save_initial:
        steps.add(0)
    if train.save_every_steps:
        steps.update(range(train.save_every_steps, last + 1, train.save_every_steps))
    return sorted(s for s in steps if s / steps_per_epoch >= train.save_from_epoch)
