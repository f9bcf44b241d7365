"""Ray Tune sweeps over TWA settings on one shared, read-only candidate store.

Each trial is a Tune function (the driver) that launches the library's sharded TWA
TorchTrainer (``run_twa``) and forwards its per-epoch metrics to Tune with
``TuneReportCallback``; ASHA stops poor trials early. Trials select on data that
trained nothing in them (``twa.select_ratio`` / the val split; see
``builders.twa_datasets``) and never see the test split, which is read once, for the
best trial's final weights. Running the same sweep again restores it (``Tuner.restore``):
finished trials are kept, unfinished ones resume from their Ray Train checkpoints.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config, config_to_dict, select_candidates
from ..store import CandidateStore
from .search_space import apply_params, max_epochs, param_space, trial_concurrency

log = logging.getLogger(__name__)


def _trial_event(path: str, event: str, trial_id: str) -> None:
    """One line per trial start/end (lets users and tests see what ran, and when)."""
    with open(path, "a") as f:
        f.write(f"{time.time():.3f} {event} {trial_id}\n")


def twa_trial(params: dict, *, base: dict, store_uri: str, train_storage: str, events: str) -> None:
    """One trial: TWA with ``params`` applied to the base config, on Ray Train workers."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ..distributed.twa_train import run_twa

    trial_id = tune.get_context().get_trial_id()
    cfg = apply_params(base, params)
    cfg.twa.checkpoint_every_steps = None  # one report per epoch: the metric ASHA compares
    _trial_event(events, "start", trial_id)
    run_twa(cfg, store_uri, storage_path=train_storage, run_name=f"trial-{trial_id}",
            callbacks=[TuneReportCallback()])
    _trial_event(events, "end", trial_id)


@dataclass
class SweepResult:
    rows: list[dict]  # one per trial (tune_results.parquet)
    best: dict  # trial_id, params, metric, selection metric, checkpoint_path
    experiment_path: str


def _status(result, done: bool) -> str:
    if result.error is not None:
        return "error"
    return "completed" if done else "stopped early"


def run_sweep(cfg: Config, store_uri: str) -> SweepResult:
    """Run (or resume) the sweep ``cfg.tune`` describes over the candidates at ``store_uri``."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    run_dir = Path(cfg.run_dir).resolve()
    storage = run_dir / "tune"
    name = f"{cfg.name}-tune"
    events = run_dir / "tune_trials.log"
    trainable = tune.with_resources(
        tune.with_parameters(
            twa_trial, base=config_to_dict(cfg), store_uri=store_uri,
            train_storage=str(run_dir / "tune_train"), events=str(events),
        ),
        {"cpu": cfg.tune.trial_cpus},
    )
    resources = ray.cluster_resources()
    concurrency = trial_concurrency(cfg, resources.get("CPU", 1), resources.get("GPU", 0))
    experiment = storage / name
    if tune.Tuner.can_restore(str(experiment)):
        log.info("resuming the sweep in %s (finished trials are kept)", experiment)
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        scheduler = None
        if cfg.tune.asha.enabled:
            scheduler = ASHAScheduler(
                # one report per TWA epoch (and round; at most one round per candidate): past
                # the last one, so ASHA never cuts a trial that is finishing
                time_attr="training_iteration", max_t=max_epochs(cfg) * len(CandidateStore.open(store_uri)) + 1,
                grace_period=cfg.tune.asha.grace_period, reduction_factor=cfg.tune.asha.reduction_factor,
            )
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(cfg),
            tune_config=tune.TuneConfig(
                metric=cfg.tune.metric, mode=cfg.tune.mode, num_samples=cfg.tune.num_samples,
                max_concurrent_trials=concurrency, scheduler=scheduler,
            ),
            run_config=tune.RunConfig(name=name, storage_path=str(storage)),
        )
    log.info("sweep %s: up to %d trial(s) at a time", name, concurrency)
    grid = tuner.fit()

    available = len(CandidateStore.open(store_uri))
    rows, finished = [], []
    for result in grid:
        history = result.metrics_dataframe
        metric_values = history[cfg.tune.metric].dropna().tolist() if history is not None and cfg.tune.metric in history else []
        metrics = result.metrics or {}
        done = bool(metrics.get("twa_complete"))
        trial_cfg = apply_params(config_to_dict(cfg), result.config)
        row = {
            "trial_id": metrics.get("trial_id") or Path(result.path).name,
            **{key: value for key, value in result.config.items()},
            "subspace_size": len(select_candidates(trial_cfg.twa.candidates, available)),
            f"final_{cfg.tune.metric}": metric_values[-1] if metric_values else None,
            f"best_{cfg.tune.metric}": (max if cfg.tune.mode == "max" else min)(metric_values) if metric_values else None,
            "epochs_run": len(metric_values),
            "status": _status(result, done),
            "time_s": metrics.get("time_total_s"),
        }
        rows.append(row)
        if done and metric_values:
            finished.append((row, result, metrics))
    if not finished:
        raise RuntimeError(f"no trial of the sweep in {experiment} finished: see the errors above")
    pick = max if cfg.tune.mode == "max" else min
    row, result, metrics = pick(finished, key=lambda item: item[0][f"final_{cfg.tune.metric}"])
    best = {
        "trial_id": row["trial_id"], "params": dict(result.config), "metric": cfg.tune.metric,
        "selection_metric": row[f"final_{cfg.tune.metric}"], "checkpoint_path": metrics.get("checkpoint_path"),
    }
    return SweepResult(rows, best, str(experiment))


def best_weights(best: dict) -> torch.Tensor:
    """The best trial's final weights (D,), from its last Ray Train checkpoint."""
    from ..distributed.twa_train import FINAL_FILE

    path = best.get("checkpoint_path")
    if not path or not (Path(path) / FINAL_FILE).exists():
        raise FileNotFoundError(f"the best trial {best['trial_id']} left no final checkpoint at {path}")
    return torch.load(Path(path) / FINAL_FILE, weights_only=True)["weights"]
