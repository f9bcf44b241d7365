"""Ray Tune sweeps over TWA settings on one shared, read-only candidate store.

Each trial is a Tune function (the driver) that launches the library's sharded TWA
TorchTrainer (``run_twa``) and forwards its per-epoch metrics to Tune with
``TuneReportCallback``; ASHA stops poor trials early. Trials select on data that
trained nothing in them (``twa.select_ratio`` / the val split; see
``data.from_config.twa_datasets``) and never see the test split, which is read once, for the
best trial's final weights.

Running the same sweep again restores it (``Tuner.restore``), whatever settings the
caller now has: Tune restores the first run's search space, samples and ASHA settings.
The tune job therefore records the sweep's config in its run folder before it starts and
refuses a rerun with other settings before Ray starts (``pipelines.runs.check_recorded_config``,
in ``cli.tune``); a caller of ``run_sweep`` does the same. A trial trains at most
once, whatever the timing of an interruption: when it finishes it writes its record
(history, final metrics, checkpoint path) atomically to ``tune_trials/<trial_id>.json``;
a trial Tune starts again finds the record, reports it and returns without starting a
worker group. (Tune itself counts a trial as finished only once it has saved its
experiment state, so a trial that ended just before Ctrl+C would otherwise run again.)
An unfinished trial resumes from its latest Ray Train checkpoint. ``tune_trials.log``
records, per trial: ``start`` (a TWA worker group starts), ``epoch R.E`` (a TWA epoch's
checkpoint was registered), ``end`` (the record is written) and ``reused``.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from ray.train import UserCallback

from ..config import Config, config_to_dict, select_candidates
from ..output.atomic import write_json
from ..store import CandidateStore
from .search_space import apply_params, max_epochs, param_space, trial_concurrency, trial_cpus_per_worker

log = logging.getLogger(__name__)

RECORDS = "tune_trials"  # folder of the run folder: one finished trial's record per file
EVENTS = "tune_trials.log"


def _trial_event(path: str, event: str, trial_id: str, detail: str = "") -> None:
    """One line per trial event (lets users and tests see what ran, and when)."""
    with open(path, "a") as f:
        f.write(f"{time.time():.3f} {event} {trial_id}{' ' + detail if detail else ''}\n")


def read_trial_record(records: str | Path, trial_id: str) -> dict | None:
    """The record a finished trial wrote, or None while it has not finished."""
    path = Path(records) / f"{trial_id}.json"
    return json.loads(path.read_text()) if path.exists() else None


class EpochEvents(UserCallback):
    """Runs in the Ray Train controller: an ``epoch`` event per registered TWA epoch."""

    def __init__(self, events: str, trial_id: str):
        self.events, self.trial_id = events, trial_id

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if "epoch" in metrics[0]:
            _trial_event(self.events, "epoch", self.trial_id, f"{metrics[0]['round']}.{metrics[0]['epoch']}")


def twa_trial(params: dict, *, base: dict, store_uri: str, train_storage: str, events: str, records: str) -> None:
    """One trial: TWA with ``params`` applied to the base config, on Ray Train workers."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ..runtime.twa_train import run_twa

    trial_id = tune.get_context().get_trial_id()
    record = read_trial_record(records, trial_id)
    if record is not None:  # finished before an interruption: report, never train again
        _trial_event(events, "reused", trial_id)
        tune.report(record["final"])
        return
    cfg = apply_params(base, params)
    cfg.twa.checkpoint_every_steps = None  # one report per epoch: the metric ASHA compares
    cfg.twa.select_eval = True  # that metric
    cfg.twa.cpus_per_worker = trial_cpus_per_worker(cfg)
    _trial_event(events, "start", trial_id)
    result = run_twa(cfg, store_uri, storage_path=train_storage, run_name=f"trial-{trial_id}",
                     callbacks=[TuneReportCallback(), EpochEvents(events, trial_id)])
    final = {**(result.history[-1] if result.history else {}), "twa_complete": True,
             "checkpoint_path": result.checkpoint_path}
    write_json(Path(records) / f"{trial_id}.json", {
        "trial_id": trial_id, "params": params, "history": result.history, "final": final,
        "time_s": result.wall_time_s,
    })
    _trial_event(events, "end", trial_id)


@dataclass
class SweepResult:
    rows: list[dict]  # one per trial (tune_results.parquet)
    best: dict  # trial_id, params, metric, selection metric, checkpoint_path
    experiment_path: str


def sweep_run_config(name: str, storage_path: str, verbose: bool = False):
    """The sweep's ``tune.RunConfig``: Tune's own console reporter (its trial status tables)
    silent (``verbose=0``) unless ``verbose``, which keeps Tune's default."""
    from ray import tune

    return tune.RunConfig(name=name, storage_path=storage_path, verbose=None if verbose else 0)


def run_sweep(cfg: Config, store_uri: str, verbose: bool = False) -> SweepResult:
    """Run (or resume) the sweep ``cfg.tune`` describes over the candidates at ``store_uri``;
    Tune's trial tables only when ``verbose`` (a resumed sweep keeps its first run's setting)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    run_dir = Path(cfg.run_dir).resolve()
    storage = run_dir / "tune"
    name = f"{cfg.name}-tune"
    records = run_dir / RECORDS
    trainable = tune.with_resources(
        tune.with_parameters(
            twa_trial, base=config_to_dict(cfg), store_uri=store_uri,
            train_storage=str(run_dir / "tune_train"), events=str(run_dir / EVENTS), records=str(records),
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
            run_config=sweep_run_config(name, str(storage), verbose),
        )
    log.info("sweep %s: up to %d trial(s) at a time", name, concurrency)
    grid = tuner.fit()

    available = len(CandidateStore.open(store_uri))
    metric, rows, finished = cfg.tune.metric, [], []
    for result in grid:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        record = read_trial_record(records, trial_id)
        if record is not None:  # what the trial trained, however often Tune started it
            history, time_s = record["history"], record["time_s"]
        else:
            frame = result.metrics_dataframe
            history = frame.to_dict("records") if frame is not None else []
            time_s = metrics.get("time_total_s")
        values = [h[metric] for h in history if h.get(metric) is not None and h[metric] == h[metric]]
        trial_cfg = apply_params(config_to_dict(cfg), result.config)
        row = {
            "trial_id": trial_id,
            **{key: value for key, value in result.config.items()},
            "subspace_size": len(select_candidates(trial_cfg.twa.candidates, available)),
            f"final_{metric}": values[-1] if values else None,
            f"best_{metric}": (max if cfg.tune.mode == "max" else min)(values) if values else None,
            "epochs_run": len(values),
            "status": "completed" if record is not None else "error" if result.error is not None else "stopped early",
            "time_s": time_s,
        }
        rows.append(row)
        if record is not None and values:
            finished.append((row, record))
    if not finished:
        raise RuntimeError(f"no trial of the sweep in {experiment} finished: see the errors above")
    pick = max if cfg.tune.mode == "max" else min
    row, record = pick(finished, key=lambda item: item[0][f"final_{metric}"])
    best = {
        "trial_id": row["trial_id"], "params": dict(record["params"]), "metric": metric,
        "selection_metric": row[f"final_{metric}"], "checkpoint_path": record["final"]["checkpoint_path"],
    }
    rows.sort(key=lambda r: r["trial_id"])
    return SweepResult(rows, best, str(experiment))


def best_weights(best: dict) -> torch.Tensor:
    """The best trial's final weights (D,), from its last Ray Train checkpoint."""
    from ..runtime.twa_loop import FINAL_FILE

    path = best.get("checkpoint_path")
    if not path or not (Path(path) / FINAL_FILE).exists():
        raise FileNotFoundError(f"the best trial {best['trial_id']} left no final checkpoint at {path}")
    return torch.load(Path(path) / FINAL_FILE, weights_only=True)["weights"]
