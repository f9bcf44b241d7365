"""Candidates from Ray Train runs and Ray Tune experiments; any other folder goes to
:func:`twa_ray.store.find_checkpoints`. Ray is imported only to read a Ray folder.

    from twa_ray.tune.ray_results import import_checkpoints
    store = import_checkpoints("~/ray_results/sweep", "runs/soup/candidates", model,
                               metric="val_acc", mode="max")     # default: each trial's last

On disk (Ray 2.60, Train V2):

    <storage_path>/<run name>/                  a Ray Train run
        checkpoint_manager_snapshot.json        its reported checkpoints with their metrics (JSON)
        checkpoint_2026-12-07_10-56-54.221150/  one folder per kept checkpoint
    <storage_path>/                             several Train runs side by side: one candidate each
    <storage_path>/<experiment>/                a Ray Tune experiment
        tuner.pkl, experiment_state-*.json      the experiment's state (cloudpickle: never read)
        <trial name>/result.json                one JSON line per report, naming its checkpoint
        <trial name>/checkpoint_000001/         one folder per kept checkpoint
        <trial name>/error.pkl                  only in a failed trial (cloudpickle)

One candidate per run or trial, in natural order of their names: its last checkpoint, or
with ``metric`` its best by that reported metric (``mode`` "max" or "min"), as Ray's
``Result`` picks them: ``ray.train.Result.from_path`` (Train V2, from the JSON snapshot)
for a run, ``ray.tune.Result.from_path`` (from result.json) for a trial. ``ResultGrid``,
``ExperimentAnalysis`` and ``Tuner.restore`` are not used: they unpickle
``experiment_state-*.json`` and ``tuner.pkl`` with cloudpickle, which runs whatever code
the file holds. For the same reason a failed trial (``error.pkl``, which
``Result.from_path`` would unpickle) is skipped with a warning. Within the chosen
checkpoint folder, :func:`twa_ray.store.importers.checkpoint_in_folder` picks what to read
(our ``state.pt``, a Hugging Face or DCP folder, one ``.pt`` / ``.safetensors`` / ``.ckpt``).
Local folders only.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from ..store import CandidateStore
from ..store import importers
from ..store.formats.common import CheckpointError, CheckpointFile, natural_key

log = logging.getLogger(__name__)

__all__ = ["find_checkpoints", "import_checkpoints", "ray_result_checkpoints", "ray_results_kind"]

TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of a run's checkpoints
TRIAL_RESULTS = ("result.json", "progress.csv")  # what ray.tune.Result.from_path reads
TRIAL_ERROR = "error.pkl"
MODES = ("max", "min")


def ray_results_kind(folder: str | os.PathLike) -> str | None:
    """What Ray wrote in ``folder``, from file names alone: ``"train_run"``, ``"train_runs"``
    (a storage path holding runs), ``"tune_experiment"``, ``"tune_trial"``, or None."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if (folder / TRAIN_SNAPSHOT).is_file():
        return "train_run"
    if any(m for pattern in importers.TUNE_MARKERS for m in folder.glob(pattern)):
        return "tune_experiment"
    if any((folder / name).is_file() for name in TRIAL_RESULTS):
        return "tune_trial"
    if any((sub / TRAIN_SNAPSHOT).is_file() for sub in _subfolders(folder)):
        return "train_runs"
    return None


def _subfolders(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: (natural_key(p.name), p.name))


def _runs(folder: Path, kind: str) -> list[tuple[Path, bool]]:
    """(folder, is a Train run) of every run or trial of a ``kind`` folder."""
    if kind in ("train_run", "tune_trial"):
        return [(folder, kind == "train_run")]
    if kind == "train_runs":
        return [(sub, True) for sub in _subfolders(folder) if (sub / TRAIN_SNAPSHOT).is_file()]
    return [(sub, False) for sub in _subfolders(folder) if any((sub / n).is_file() for n in TRIAL_RESULTS)]


def _result(run: Path, train: bool) -> Any:
    """Ray's ``Result`` of a Train run (V2) or a Tune trial, read from JSON only."""
    try:
        if train:
            from ray.train.v2.api.result import Result  # ray.train.Result under Train V2 (Ray 2.60's default)
        else:
            from ray.tune import Result
        return Result.from_path(str(run))
    except (RuntimeError, OSError, ValueError) as exc:
        raise CheckpointError(f"{run}: cannot read it as a Ray {'Train run' if train else 'Tune trial'}: {exc}") from exc


def _chosen(run: Path, train: bool, metric: str | None, mode: str) -> Path | None:
    """The folder of the checkpoint picked in ``run`` (None: it has none, or failed)."""
    if not train and (run / TRIAL_ERROR).exists():
        log.warning("skipping the failed trial %s: reading it would unpickle its %s (cloudpickle runs code)",
                    run, TRIAL_ERROR)
        return None
    result = _result(run, train)
    if not result.best_checkpoints:
        log.warning("skipping %s: it reported no checkpoint (or kept none)", run)
        return None
    if metric is None:
        checkpoint = result.checkpoint
    else:
        try:
            checkpoint = result.get_best_checkpoint(metric, mode)
        except RuntimeError:  # Ray: no checkpoint was reported with this metric
            reported = sorted({k for _, m in result.best_checkpoints for k in (m or {})})
            raise CheckpointError(f"{run}: no checkpoint was reported with the metric {metric!r} "
                                  f"(its checkpoints' metrics: {reported})") from None
    import pyarrow.fs as pafs

    if not isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        raise CheckpointError(f"{run}: its checkpoint {checkpoint.path} is not on the local filesystem "
                              f"({type(checkpoint.filesystem).__name__}): copy the folder here first")
    return Path(checkpoint.path)


def ray_result_checkpoints(folder: str | os.PathLike, metric: str | None = None,
                           mode: str = "max") -> list[CheckpointFile]:
    """One candidate per Ray Train run or Tune trial of ``folder`` (see the module docstring):
    its last checkpoint, or its best by ``metric`` (``mode`` "max" / "min"). Entries are the
    checkpoint folders' paths relative to ``folder``.

    Raises CheckpointError naming the folder when it is no Ray Train run or Tune experiment,
    when no run has a checkpoint, or naming the run when one lacks ``metric``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    folder = Path(folder).resolve()
    kind = ray_results_kind(folder)
    if kind is None:
        raise CheckpointError(f"{folder} is not a Ray Train run or Ray Tune experiment folder (no {TRAIN_SNAPSHOT}, "
                              f"{' / '.join(importers.TUNE_MARKERS)} or trials with {' / '.join(TRIAL_RESULTS)})")
    runs = _runs(folder, kind)
    found = []
    for run, train in runs:
        path = _chosen(run, train, metric, mode)
        if path is None:
            continue
        ckpt = importers.checkpoint_in_folder(path, os.path.relpath(path, folder))
        if ckpt is None:
            raise CheckpointError(f"{path}: the checkpoint Ray reported holds no checkpoint file "
                                  f"({', '.join(importers.CHECKPOINT_SUFFIXES)}, a Hugging Face or DCP folder)")
        found.append(ckpt)
    if not found:
        raise CheckpointError(f"no checkpoints in {folder}: none of its {len(runs)} Ray "
                              f"{'runs' if kind.startswith('train') else 'trials'} has one")
    log.info("%s: %d candidates (%s checkpoint of each %s)", folder, len(found),
             "last" if metric is None else f"best {mode} {metric}", "run" if kind.startswith("train") else "trial")
    return found


def find_checkpoints(folder: str | os.PathLike, metric: str | None = None, mode: str = "max") -> list[CheckpointFile]:
    """The candidates of ``folder``: :func:`ray_result_checkpoints` for a Ray Train run or Tune
    experiment, else :func:`twa_ray.store.find_checkpoints` (where ``metric`` has no meaning)."""
    if ray_results_kind(folder) is not None:
        return ray_result_checkpoints(folder, metric, mode)
    if metric is not None:
        raise CheckpointError(f"{folder} is not a Ray Train run or Ray Tune experiment folder: a checkpoint metric "
                              f"({metric!r}) picks among a run's checkpoints only")
    return importers.find_checkpoints(folder)


def import_checkpoints(folder: str | os.PathLike, store_uri: str | os.PathLike, model: nn.Module,
                       meta: Mapping[str, Any] | None = None, metric: str | None = None,
                       mode: str = "max") -> CandidateStore:
    """:func:`twa_ray.store.import_checkpoints` of the candidates :func:`find_checkpoints` lists."""
    return importers.import_checkpoints(folder, store_uri, model, meta, checkpoints=find_checkpoints(folder, metric, mode))
