"""Base training on Ray Train (data parallel): it saves the candidates TWA averages.

    from twa_ray.config import load_config
    from twa_ray.runtime.ray_env import init_ray
    from twa_ray.runtime.base_train import run_base_training

    init_ray()
    result = run_base_training(load_config("configs/quickstart.yaml"))
    print(result.store_uri, result.num_candidates)

The driver (:func:`run_base_training`) launches a ``TorchTrainer`` (``trainer.torch_trainer``)
whose workers run ``base_loop.train_loop_per_worker``:

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
- ``train.sharding`` (``parallel.sharding``): ``blocks``, DDP replicas; ``fsdp``, the workers
  shard the model with FSDP2 and every rank writes its rows of each candidate, in parallel;
  the store ends up with the same candidates.
- Every epoch all ranks report metrics; rank 0 attaches a checkpoint (model, optimizer,
  scheduler, EMA, epoch, step, metrics history; with ``train.sharding: fsdp`` every rank
  attaches its shards of the model, optimizer and EMA). A restarted worker group (FailureConfig)
  or a re-run with the same run name resumes at the next epoch, exactly (the EMA too);
  candidates already in the store (same global step) are not written twice.
- The full-budget comparison (:func:`run_full_budget_training`) continues from base
  training's last checkpoint to the end of the schedule and writes no candidates: its
  first epochs are base training's by construction. SGD at equal compute
  (:func:`run_sgd_same_compute_training`) continues it for TWA's epochs instead, the rest of
  the schedule compressed into them (``core.schedules.make_compressed_scheduler``).

Base training reads ``splits.train`` only. ``splits.val`` is evaluated each epoch for
monitoring (val_acc, val_loss); it trains nothing here. The test split is never read.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import Config, config_from_dict, config_to_dict, settle_locations
from ..core.params import ParamLayout, flatten_state
from ..store import CandidateStore
from ..store import fs as store_fs
from .base_loop import train_loop_per_worker
from .checkpoint_reads import has_shards, read_shards
from .checkpoints import load_ray_checkpoint
from .trainer import WorkerGroup, torch_trainer

log = logging.getLogger(__name__)


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
    compress: dict | None = None,
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
        compress: {"from_epoch", "start_step", "epochs"}: run epochs ``from_epoch`` + 1 ..
            ``from_epoch + epochs`` from ``init_checkpoint`` (taken after ``start_step`` steps) with
            the schedule's rest compressed into them (``core.schedules.make_compressed_scheduler``):
            SGD at equal compute, :func:`run_sgd_same_compute_training`.

    Ray must be initialised (``twa_ray.runtime.ray_env.init_ray``). Raises ``ConfigError`` for an
    invalid config and Ray's ``TrainingFailedError`` when the workers fail more than
    ``train.max_failures`` times.
    """
    cfg = settle_locations(cfg)  # a job's config is settled already; workers run in another cwd
    raw = config_to_dict(cfg)
    raw["store"] = store_uri or cfg.store_uri
    if epochs is not None:
        raw["train"]["epochs"] = epochs
        raw["train"]["budget_epochs"] = cfg.train.schedule_epochs
    config_from_dict(raw, where="run_base_training")  # fail here, not in every worker

    name = run_name or f"{cfg.name}-base"
    storage = storage_path or cfg.ray_storage
    workers = WorkerGroup.of(cfg.train, cpus_per_worker)
    trainer = torch_trainer(
        train_loop_per_worker,
        {"config": raw, "run_storage": store_fs.join(storage, name), "init_checkpoint": init_checkpoint,
         "write_candidates": write_candidates, "compress": compress},
        workers, name=name, storage_path=storage, max_failures=cfg.train.max_failures,
    )
    log.info("base training %s: %s, %d epochs of a %d-epoch schedule, store %s", name, workers.describe(),
             raw["train"]["epochs"] if compress is None else compress["from_epoch"] + compress["epochs"],
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


def run_sgd_same_compute_training(cfg: Config, base: BaseTrainResult | None, epochs: int,
                                  **kwargs: Any) -> BaseTrainResult | None:
    """SGD at equal compute: base training continued from ``base``'s last checkpoint (model,
    optimizer, EMA, step) for ``epochs`` epochs (TWA's, over its rounds), the rest of the
    budget's schedule compressed into them (``core.schedules.make_compressed_scheduler``:
    step decays at the same fractions of the continuation, cosine and linear annealed to
    their final value). Base training's epochs are not run again; no candidates are written;
    the final weights are in the result's ``checkpoint_path``, its ``metrics`` are the
    epochs it ran itself. None (a warning says why) without base training's checkpoint.
    Run ``<name>-sgd-same-compute-<epochs>``; ``kwargs`` go to :func:`run_base_training`.
    """
    start = base.checkpoint_path if base is not None else None
    if start is None or epochs < 1:
        log.warning("SGD at equal compute: %s; left out", "no base-training checkpoint to continue from"
                    if start is None else f"TWA trained {epochs} epochs")
        return None
    info = checkpoint_info(start)
    continued_from = int(info.get("epoch", 0))
    kwargs.setdefault("run_name", f"{cfg.name}-sgd-same-compute-{epochs}")
    compress = {"from_epoch": continued_from, "start_step": int(info.get("step", 0)), "epochs": epochs}
    result = run_base_training(cfg, init_checkpoint=start, write_candidates=False, compress=compress, **kwargs)
    result.metrics = [m for m in result.metrics if m.get("epoch", 0) > continued_from]
    return result


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
