"""Sharded TWA's Ray Train worker loop (``twa_train.run_twa`` launches it) and its run state.

Each of k workers holds its slice of every global batch and its shard of the projection, as
the ``twa.sharding`` mode builds it (``parallel.sharding``: ``blocks``, a full model replica and
the packed projection of its own blocks; ``fsdp``, FSDP2 row shards of the model and of the
projection); the loop calls the mode and never asks which it is. Every epoch (and every
``twa.checkpoint_every_steps``) rank 0 reports a checkpoint of the run state
(:class:`TWARunState`: the coefficients and every rank's BatchNorm buffers), so a restarted
worker group resumes at the same step with the same data order; each step seeds torch's
generators, so it also replays the same augmentations and dropout masks. The center (w(X)
of a finished round, the next round's origin) is checkpointed as the mode keeps it: whole in
rank 0's state file (``blocks``), or every rank's rows as sharded state (``fsdp``).
"""
from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field, fields, replace
from typing import Callable, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..config import Config, config_from_dict
from ..core import TWA
from ..core.blocks import make_blocks
from ..data import calibration_loader
from ..data.from_config import twa_datasets
from ..output.console import Progress, setup_logging
from ..parallel.batches import ShardedBatchSampler, batches_per_epoch, loader_for, local_slice
from ..parallel.evaluate import evaluate_across_ranks
from ..parallel.process_group import all_reduce_sum, gather_from_ranks
from ..parallel.sharding import ShardingMode, sharding_mode
from ..parallel.sharding.fsdp_tensors import local_param_bytes
from ..store import CandidateStore
from ..tasks import Task, loss_and_sums, recalibrate_bn_by_task, task_data, task_from_config, to_device
from .checkpoint_reads import load_shards
from .checkpoints import load_ray_checkpoint
from .worker import inject_fault, report, seed_rng, sync_batchnorm

log = logging.getLogger(__name__)

FINAL_FILE = "twa_final.pt"  # in the last checkpoint: the result run_twa and Tune's best_weights read


@dataclass
class TWARunState:
    """Where a TWA run stands. Every checkpoint holds one (:meth:`to_checkpoint`): its
    tensors in the state file, the rest in the JSON info, both read without pickled code."""

    TENSORS: ClassVar[tuple[str, ...]] = ("twa", "center", "coefficients", "buffers")

    round: int = 0  # the round to run next (len(rounds): all done)
    epoch: int = 0  # the epoch of that round to run next
    batch: int = 0  # the batch of that epoch to run next
    twa: dict | None = None  # TWA.state_dict() inside a round: X (n, L), optimizer, scheduler, num_steps
    # w(X) of the last finished round, the next round's origin, as the mode keeps it
    # (ShardingMode.round_center): blocks (D,); fsdp this rank's rows (numel(rank),),
    # checkpointed sharded (DCP), not in the state file
    center: torch.Tensor | None = None
    coefficients: list[torch.Tensor] = field(default_factory=list)  # per finished round: X (n_r, L)
    buffers: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per rank: the model's buffers
    history: list[dict] = field(default_factory=list)  # metrics of each finished epoch
    projection_bytes: list[int] = field(default_factory=list)  # per rank, in the latest round
    param_bytes: list[int] = field(default_factory=list)  # per rank: its trainable parameters (FSDP: its shards)
    elapsed_s: float = 0.0  # inside the workers, all attempts together
    done: bool = False
    data_seed: int | None = None  # cfg.seed of the run: the data order follows from it

    def to_checkpoint(self) -> tuple[dict, dict]:
        """(state, info) for ``checkpoints.ray_checkpoint``."""
        state = {name: getattr(self, name) for name in self.TENSORS}
        info = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.TENSORS}
        return state, info

    @classmethod
    def from_checkpoint(cls, state: dict, info: dict) -> TWARunState:
        return cls(**state, **info)


@dataclass
class _Worker:
    """One worker's fixed set-up: config, place in the group, model, data."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    model: nn.Module
    task: Task  # cfg.task, with twa.label_smoothing
    collate_fn: Callable | None  # the task's
    store: CandidateStore
    rounds: list[list[int]]
    train_data: Dataset
    select_data: Dataset | None
    calibration: DataLoader  # BatchNorm recalibration before each selection evaluation
    batch_size: int  # global
    steps_per_round: int
    marker_dir: str
    started: float = field(default_factory=time.time)

    @functools.cached_property
    def mode(self) -> ShardingMode:
        """twa.sharding's mode."""
        return sharding_mode(self.cfg.twa.sharding)


def twa_train_loop(config: dict) -> None:
    """Ray Train ``train_loop_per_worker`` for sharded TWA: rounds of epochs of steps."""
    import ray.train

    w = _setup(config)
    run = _resume(w, ray.train.get_checkpoint())
    epochs = w.cfg.twa.epochs
    progress = Progress("TWA", total=len(w.rounds) * epochs, steps_per_unit=w.steps_per_round // epochs,
                        start=run.round * epochs + run.epoch, logger=log)
    for r in range(run.round, len(w.rounds)):
        twa = _start_round(w, run, r)
        for epoch in range(run.epoch, epochs):
            metrics = _train_epoch(w, run, twa, r, epoch, progress)
            if metrics is None:
                return  # a non-finite loss, reported with the last good coefficients: no retry
            run.history.append(metrics)
            run.batch = 0
            if r < len(w.rounds) - 1 or epoch < w.cfg.twa.epochs - 1:  # the last one goes with the result
                _report(w, run, metrics, _snapshot(w, run, twa, round=r, epoch=epoch + 1, batch=0))
        run.coefficients.append(twa.X.detach().cpu().clone())
        run.center = w.mode.round_center(w.model, twa)
        run.round, run.epoch, run.batch, run.twa = r + 1, 0, 0, None
    _report_final(w, run)


def _setup(config: dict) -> _Worker:
    import ray.train
    import ray.train.torch

    cfg = config_from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    setup_logging(rank=rank)  # one narrating rank, every rank warns
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)
    task = task_from_config(cfg, "twa", config["cwd"])
    data = task_data(task)
    train_data, select_data = twa_datasets(cfg, data)
    model = sync_batchnorm(task.build_model(), cfg.model.sync_bn, device, rank, world).to(device)
    model = sharding_mode(cfg.twa.sharding).wrap(model, world, device)
    batch_size = cfg.twa.batch_size or cfg.data.batch_size
    return _Worker(
        cfg, rank, world, device, model, task, data.collate_fn, CandidateStore.open(config["store_uri"]),
        candidate_rounds(config["candidates"], cfg.twa.candidates_per_round), train_data, select_data,
        calibration_loader(data.train_eval, cfg.data.eval_batch_size, cfg.twa.bn_batches, cfg.seed, data.collate_fn),
        batch_size,
        batches_per_epoch(len(train_data), batch_size, min_last=world) * cfg.twa.epochs, config["marker_dir"],
    )


def candidate_rounds(indices: list[int], per_round: int | None) -> list[list[int]]:
    """Split the chosen candidates into rounds of at most ``per_round`` (None: one round).

    Round t > 0 is centred on round t-1's solution, so even a round of a single
    candidate spans a line.
    """
    if per_round is None or per_round >= len(indices):
        return [list(indices)]
    return [indices[i : i + per_round] for i in range(0, len(indices), per_round)]


def _resume(w: _Worker, checkpoint) -> TWARunState:
    """The run state of the latest checkpoint (this rank's buffers loaded), or a fresh one."""
    if checkpoint is None:
        return TWARunState(data_seed=w.cfg.seed)
    run = TWARunState.from_checkpoint(*load_ray_checkpoint(checkpoint))
    if run.data_seed != w.cfg.seed:
        raise ValueError(f"the checkpoint was made with seed {run.data_seed}, this run has seed {w.cfg.seed}")
    if run.buffers:
        if len(run.buffers) != w.world:
            raise ValueError(f"the checkpoint holds the buffers of {len(run.buffers)} workers, this run has {w.world}")
        w.model.load_state_dict(run.buffers[w.rank], strict=False)
    run.center = w.mode.resume_center(w.model, run.center, run.round, functools.partial(load_shards, checkpoint))
    return run


def _start_round(w: _Worker, run: TWARunState, r: int) -> TWA:
    """This rank's TWA of round r (resumed from ``run.twa`` when set); records projection bytes."""
    setup = w.mode.build_twa(w.model, w.store, w.rounds[r], w.cfg.twa, w.steps_per_round, w.rank, w.world,
                             center=run.center)
    twa = setup.twa
    if run.twa is not None:
        twa.load_state_dict(run.twa)
    nbytes = torch.zeros(2, w.world, dtype=torch.float64)
    nbytes[0, w.rank], nbytes[1, w.rank] = twa.projection.nbytes, local_param_bytes(w.model)
    run.projection_bytes, run.param_bytes = ([int(v) for v in row] for row in all_reduce_sum(nbytes, w.device).tolist())
    if w.rank == 0:
        log.info("TWA round %d/%d: %d candidates, %d blocks, projection bytes per worker %s, parameter bytes %s%s",
                 r + 1, len(w.rounds), len(w.rounds[r]), len(setup.blocks), run.projection_bytes, run.param_bytes,
                 f", exchange {setup.exchange}" if setup.exchange else "")
    return twa


def _train_epoch(w: _Worker, run: TWARunState, twa: TWA, r: int, epoch: int, progress: Progress) -> dict | None:
    """Epoch ``epoch`` of round r from batch ``run.batch`` on: its metrics, or None when the
    loss became non-finite (then reported with the last good coefficients)."""
    cfg, t0 = w.cfg, time.time()
    sampler = ShardedBatchSampler(len(w.train_data), w.batch_size, w.rank, w.world, cfg.seed, 1000 * r + epoch,
                                  start_batch=run.batch, min_last=w.world)  # no rank's slice is empty
    batches = iter(loader_for(w.train_data, sampler, collate_fn=w.collate_fn))
    sums = torch.zeros(2, dtype=torch.float64, device=w.device)  # loss sum, examples (this rank)
    for j, global_size in enumerate(sampler.global_sizes):
        step = r * w.steps_per_round + twa.num_steps
        inject_fault("twa", "step", step, w.rank, w.world, w.marker_dir,
                     fail_at=cfg.debug.fail_at_step, pause_at=cfg.debug.pause_at_step)
        seed_rng(cfg.seed, step, w.rank)  # before the batch is drawn: its augmentation, then dropout
        loss_sum, count = _forward_backward(w, next(batches), global_size, step)
        sums[0] += loss_sum
        sums[1] += count
        try:
            twa.step()
        except FloatingPointError:
            # the gradient was all-reduced, so every rank stops here; X is still the last good one
            if w.rank == 0:
                log.error("TWA step %d: the loss is not finite; stopping with the last good coefficients", step)
            _report(w, run, {"nonfinite_at_step": step},
                    _snapshot(w, run, twa, round=r, epoch=epoch, batch=run.batch + j))
            return None
        progress.step(r * w.cfg.twa.epochs + epoch, run.batch + j + 1)  # a line now and then on long epochs
        every = cfg.twa.checkpoint_every_steps
        if every and twa.num_steps % every == 0 and j + 1 < len(sampler):
            _report(w, run, {"round": r, "epoch": epoch, "step": twa.num_steps},
                    _snapshot(w, run, twa, round=r, epoch=epoch, batch=run.batch + j + 1))
    sums = all_reduce_sum(sums, w.device)
    metrics = {
        "round": r, "epoch": epoch + 1, "step": twa.num_steps, "lr": twa.lr,
        "train_loss": float(sums[0]) / max(1.0, float(sums[1])), "examples": int(sums[1]),
        "epoch_time_s": time.time() - t0,
        **_select_metrics(w),
    }
    floats = {k: v for k, v in metrics.items() if isinstance(v, float) and k != "epoch_time_s"}
    progress.done(r * cfg.twa.epochs + epoch, **({"round": r + 1} if len(w.rounds) > 1 else {}), **floats)
    return metrics


def _forward_backward(w: _Worker, batch, global_size: int, step: int) -> tuple[torch.Tensor, int]:
    """Back-propagate this rank's share of the global batch's mean loss (the task's, of this
    rank's B_local examples of ``batch``).

    Returns (this rank's summed loss, B_local). Every rank runs it at every step: with
    SyncBatchNorm the forward pass is a collective.
    """
    w.model.train()
    for p in w.model.parameters():
        p.grad = None
    a, b = local_slice(global_size, w.rank, w.world)
    loss, _ = loss_and_sums(w.task, w.model, to_device(batch, w.device))
    loss = loss / global_size
    if w.cfg.debug.nan_at_step == step:
        loss = loss * float("nan")  # drill: a loss that became NaN
    loss.backward()
    return loss.detach().double() * global_size, b - a


def _select_metrics(w: _Worker) -> dict:
    """select_<name> of each of the task's metrics (select_acc, select_loss, ...) on the
    selection data ({} without it or without twa.select_eval)."""
    if w.select_data is None or not w.cfg.twa.select_eval:
        return {}
    # the same recalibration as the final evaluation, identical on every rank, so the
    # selection ranks the weights that are reported
    recalibrate_bn_by_task(w.model, w.task, w.calibration, w.device)
    res = evaluate_across_ranks(w.model, w.select_data, w.task, w.rank, w.world, w.device,
                                w.cfg.data.eval_batch_size, collate_fn=w.collate_fn)
    return {f"select_{k}": v for k, v in res.metrics.items()}


def _snapshot(w: _Worker, run: TWARunState, twa: TWA | None, **where: int) -> TWARunState | None:
    """The run state to checkpoint, positioned at ``where`` (round, epoch, batch), on rank 0;
    None on the others. A collective: it gathers every rank's buffers. Its center is what the
    mode puts in the state file (with FSDP None: every rank's rows go into the checkpoint's
    sharded part, :func:`_report`)."""
    params = {name for name, _ in w.model.named_parameters()}
    buffers = gather_from_ranks({k: v for k, v in w.model.state_dict().items() if k not in params}, w.device)
    if w.rank != 0:
        return None
    elapsed = run.elapsed_s if run.done else run.elapsed_s + time.time() - w.started
    return replace(run, twa=None if twa is None else twa.state_dict(), buffers=buffers, elapsed_s=elapsed,
                   center=w.mode.state_center(run.center), **where)


def _report(w: _Worker, run: TWARunState, metrics: dict, snapshot: TWARunState | None,
            final: dict | None = None) -> None:
    """Every rank: ``metrics`` with rank 0's ``snapshot`` (and ``final``), and the sharded state
    the mode makes of ``run.center`` (with FSDP every rank's rows, once a round has finished;
    a collective)."""
    state, info = snapshot.to_checkpoint() if snapshot is not None else (None, None)
    sharded = w.mode.sharded_center(w.model, run.center)
    report(metrics, state, info, None if final is None else {FINAL_FILE: final}, sharded=sharded)


def _report_final(w: _Worker, run: TWARunState) -> None:
    """The last report: the last epoch's metrics, the final state and (rank 0) FINAL_FILE."""
    if not run.done:
        run.done, run.elapsed_s = True, run.elapsed_s + time.time() - w.started
    metrics = {**(run.history[-1] if run.history else {}), "twa_complete": True}  # not "done": Tune reads that key
    snapshot = _snapshot(w, run, None)
    # the result, on rank 0 (which writes it; with FSDP gathered there only, None on the others)
    weights = w.mode.gather_result(w.model, run.center, w.rank, w.world)
    final = None
    if w.rank == 0:
        final = {
            "weights": weights, "coefficients": run.coefficients, "rounds": w.rounds, "history": run.history,
            "projection_bytes": run.projection_bytes, "param_bytes": run.param_bytes,
            "block_names": _block_names(w.store, w.cfg.twa.granularity),
            "time_s": run.elapsed_s,
        }
    _report(w, run, metrics, snapshot, final)


def _block_names(store: CandidateStore, granularity: str) -> list[str]:
    """A readable name per block: its tensor, or first..last tensor of the group."""
    blocks = make_blocks(store.numels, granularity)
    names = store.names
    return [names[a] if b - a == 1 else f"{names[a]}..{names[b - 1]}" for a, b in blocks.tensor_ranges]
