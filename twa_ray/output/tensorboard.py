"""TensorBoard event files of a run folder (``report.tensorboard: true``), written by the
driver from what the run folder already holds, so no Ray worker writes them:

    <run_dir>/tensorboard/<stage>/       one TensorBoard run per stage of metrics.parquet
                                         (base_train, twa, full_budget; the soup job's
                                         pretrain, finetune, twa, soups)
    <run_dir>/tensorboard/trial_<id>/    a sweep: one run per trial, its per-epoch history
                                         (tune_trials/<id>.json) and its parameters (HParams)

    tensorboard --logdir runs/quickstart/tensorboard

Each numeric column becomes a scalar under its own name (``val_acc``, ``train_loss``...), so
stages with the same metric share a chart. The step is the stage's epoch; a stage whose
epochs restart (TWA's rounds) or that has none counts its rows 1, 2, ... instead. The
folder is rewritten as a whole each time (its files derive from the run folder's); for a
run folder on a URI it is written locally, then uploaded.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..store import fs as store_fs

log = logging.getLogger(__name__)

EVENTS_DIR = "tensorboard"
# columns that place a row (the step) or name it, not metrics to chart
NOT_SCALARS = frozenset({"stage", "epoch", "step", "round", "examples", "train_examples"})  # counts, not curves


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def row_steps(rows: Sequence[Mapping[str, Any]]) -> list[int]:
    """The TensorBoard step of each row: its integer epoch when the epochs strictly
    increase, else 1, 2, ... (epochs that restart each round, or no epochs)."""
    epochs = [row.get("epoch") for row in rows]
    if epochs and all(_is_number(e) and float(e).is_integer() for e in epochs) and all(
            a < b for a, b in zip(epochs, epochs[1:])):
        return [int(e) for e in epochs]
    return list(range(1, len(rows) + 1))


def _scalars(row: Mapping[str, Any]) -> Iterable[tuple[str, float]]:
    for key, value in row.items():
        if key not in NOT_SCALARS and _is_number(value):
            yield key, float(value)


def _writer(log_dir: Path):
    from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

    return SummaryWriter(log_dir=str(log_dir))


def _write_rows(writer, rows: Sequence[Mapping[str, Any]]) -> None:
    for step, row in zip(row_steps(rows), rows):
        for tag, value in _scalars(row):
            writer.add_scalar(tag, value, step)


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)) or "_"


def write_run_events(run_dir: str | Path, rows: Sequence[Mapping[str, Any]] | None = None) -> Path:
    """Event files of every stage of ``rows`` (default: the run folder's metrics.parquet,
    one row per epoch with a ``stage`` column) under ``<run_dir>/tensorboard/<stage>/``;
    returns the tensorboard folder."""
    from .atomic import read_rows

    run_dir = store_fs.as_location(run_dir)
    target = run_dir / EVENTS_DIR
    if rows is None:
        rows = read_rows(run_dir / "metrics.parquet")
    stages: dict[str, list] = {}
    for row in rows:
        stages.setdefault(str(row.get("stage") or "run"), []).append(row)
    with store_fs.local_folder(target) as out:  # SummaryWriter writes local files: uploaded after for a URI
        for stage, stage_rows in stages.items():
            with _writer(out / _safe_name(stage)) as writer:
                _write_rows(writer, stage_rows)
    log.debug("TensorBoard events of %d stage(s) in %s", len(stages), target)
    return target


def _hparam_value(value: Any) -> Any:
    return value if isinstance(value, (bool, int, float, str)) else str(value)


def write_sweep_events(run_dir: str | Path, trials: Sequence[Mapping[str, Any]],
                       histories: Mapping[str, Sequence[Mapping[str, Any]]], params: Sequence[str],
                       metric: str) -> Path:
    """Event files of a sweep: per trial (a row of tune_results.parquet: ``trial_id``, the
    swept ``params``, ``metric`` = its final selection metric, ``epochs_run``) its
    per-epoch ``histories[trial_id]`` (a trial stopped early without one: its final value at
    step ``epochs_run``) and its parameters with the final metric for TensorBoard's HParams
    tab, under ``<run_dir>/tensorboard/trial_<id>/``; returns the tensorboard folder."""
    from torch.utils.tensorboard.summary import hparams

    target = store_fs.as_location(run_dir) / EVENTS_DIR
    with store_fs.local_folder(target) as out:
        for trial in trials:
            trial_id = str(trial["trial_id"])
            history = histories.get(trial_id) or []
            final = trial.get(metric)
            with _writer(out / f"trial_{_safe_name(trial_id)}") as writer:
                if history:
                    _write_rows(writer, history)
                elif _is_number(final):
                    writer.add_scalar(metric.removeprefix("final_"), float(final), int(trial.get("epochs_run") or 1))
                if _is_number(final) and math.isfinite(final):
                    values = {p: _hparam_value(trial.get(p)) for p in params if trial.get(p) is not None}
                    for summary in hparams(values, {f"hparam/{metric}": float(final)}):
                        writer.file_writer.add_summary(summary)
                    writer.add_scalar(f"hparam/{metric}", float(final))
    log.debug("TensorBoard events of %d trial(s) in %s", len(trials), target)
    return target
