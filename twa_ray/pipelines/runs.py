"""A run folder's life, the same for every job: made (or cleared by ``--force``), inputs
checked in the driver, a finished run of the same config found, and a complete run marked.

A run folder is complete when it holds ``summary.json`` (written last by
``output.run_folder``) and ``config.json`` (``record_config``) equal to the job's config,
its locations aside (settled absolute where the job runs: ``config.without_locations``).
``write_complete_run`` removes both before it writes the first file and writes
config.json last, so a run that dies while writing leaves a folder that is complete for
no config (not the earlier run's, beside this run's model.pt).

A run folder is a local folder (a ``Path``) or a URI (``s3://bucket/run``: a
``store.fs.Uri``); both join with ``/``, and every file goes through ``store.fs``.

Same settings? Whatever a job reuses from an earlier run (a candidate store, fine-tuned
models, a sweep's trials) was made with settings recorded beside it; ``require_same_settings``
is the one check of them all: other settings are refused, naming the keys that differ, with
"run with --force to start afresh, or choose another output_dir". Jobs check before Ray
starts. A sweep records its whole config in config.json (``record_config``) when it starts,
and a rerun resumes it only with the same settings (``check_recorded_config``; locations,
``config.LOCATION_KEYS``, aside).

What ``--force`` removes: only a run folder of this project, one that holds the marker
``RUN_MARKER`` (``.twa_ray_run``, a small JSON file), or an empty folder. ``prepare_run_dir``
writes the marker into a new or empty run folder before any other file, so a run that
died early is cleared too; a folder that already held other files is written into but
never marked (a run folder from before the marker existed: remove it by hand). Anything
else is refused with a ConfigError naming ``output_dir`` (or ``name``, whose default
run folder is runs/<name>), and so, with or without ``--force``, is a run folder that
is the working directory, a parent of it, home or the filesystem root
(``store.fs.protected_folder``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from ..config import (Config, ConfigError, config_to_dict, differing_settings, dotted_settings, is_plain_name,
                      recorded_config, without_locations)
from ..tasks import TaskData, check_task, task_data
from ..output.atomic import read_json, write_json
from ..store import fs as store_fs

log = logging.getLogger(__name__)

T = TypeVar("T")

COMPLETION_FILES = ("summary.json", "config.json")  # together, equal to the config: a complete run
RUN_MARKER = ".twa_ray_run"  # in a run folder of this project from its first write on: --force may remove it


def _run_dir_key(cfg: Config) -> str:
    """The config key that placed the run folder, for errors."""
    return "output_dir" if cfg.output_dir else "name (the run folder runs/<name>)"


def run_dir_location(cfg: Config) -> Path | store_fs.Uri:
    """``cfg``'s run folder (``cfg.run_dir``, absolute once the job settled its locations):
    a ``Path`` with links resolved (``~`` expanded) or a ``Uri``."""
    run_dir = store_fs.as_location(cfg.run_dir)
    return run_dir.expanduser().resolve() if isinstance(run_dir, Path) else run_dir


def prepare_run_dir(cfg: Config, force: bool = False) -> Path | store_fs.Uri:
    """The run folder, made when local (an object store has no folders) and marked
    (``RUN_MARKER``) when new or empty; with ``force`` first remove what an earlier run
    left in it. Raises ConfigError naming output_dir (or name), touching nothing, for a run
    folder that is the working directory, a parent of it, home or a filesystem root, and
    with ``force`` for a folder that is neither a marked run folder nor empty."""
    key = _run_dir_key(cfg)
    if cfg.output_dir is None and not is_plain_name(cfg.name):
        raise ConfigError(f"name: {cfg.name!r} is not a plain name: it names the run folder runs/<name>")
    run_dir = run_dir_location(cfg)
    reason = store_fs.protected_folder(run_dir)
    if reason is not None:
        raise ConfigError(f"{key}: {run_dir} is {reason}: a run folder must be a folder of its own "
                          "(e.g. runs/<name>), which --force may remove")
    if force:
        _clear_run_dir(run_dir, key)
    if isinstance(run_dir, Path):
        run_dir.mkdir(parents=True, exist_ok=True)
    if store_fs.folder_is_empty(run_dir):  # new, or emptied: ours from this first write on
        write_json(run_dir / RUN_MARKER, {"twa_ray": "run folder", "name": cfg.name})
    elif not store_fs.file_exists(run_dir / RUN_MARKER):
        log.warning("%s holds files of no marked twa_ray run folder: --force will refuse to remove it", run_dir)
    return run_dir


def _clear_run_dir(run_dir: Path | store_fs.Uri, key: str) -> None:
    """--force: remove ``run_dir`` when it is a marked run folder or empty; else ConfigError naming ``key``."""
    if not (store_fs.file_exists(run_dir / RUN_MARKER) or store_fs.folder_is_empty(run_dir)):
        raise ConfigError(f"{key}: {run_dir} is not a run folder of twa_ray (no {RUN_MARKER} in it) and not empty: "
                          "--force removes only run folders; remove it yourself, or choose another output_dir")
    if store_fs.remove_tree(run_dir):
        log.warning("--force: removed the earlier results in %s", run_dir)


def require_local_run_dir(cfg: Config, job: str) -> None:
    """ConfigError naming output_dir when it is a URI: ``job`` (the soup and tune jobs) keeps
    its run folder on a local or mounted shared path (it appends to logs, and libraries
    read its files by local path); the main job takes any URI."""
    if store_fs.is_uri(cfg.run_dir):
        raise ConfigError(f"output_dir: {cfg.run_dir!r} is a URI; {job} writes its run folder to a local path "
                          "(on a cluster an absolute path every node shares); the main job (twa-ray run) takes URIs")


def check_inputs(cfg: Config) -> TaskData:
    """Fail early, in the driver, with the task/data/model errors workers would hit: a task
    path that does not import or makes no task (naming ``task``), a missing dataset (naming
    where it looked), a val_ratio giving an empty split, an unknown model. Returns the task's
    data (test sealed)."""
    task = check_task(cfg)
    data = task_data(task)
    task.build_model()
    return data


def finished_run(cfg: Config, run_dir: Path | str) -> bool:
    """True when ``run_dir`` holds a complete run (summary.json) of exactly this config, its
    locations aside (``config.without_locations``: they are settled absolute where the job
    runs, and another copy of a ``ray job submit`` working dir reads the same data)."""
    run_dir = store_fs.as_location(run_dir)
    summary, recorded = (run_dir / name for name in COMPLETION_FILES)
    if not (store_fs.file_exists(summary) and store_fs.file_exists(recorded)):
        return False
    try:
        return not differing_settings(without_locations(recorded_config(read_json(recorded))),
                                      without_locations(config_to_dict(cfg)))
    except ValueError:
        return False


def record_config(cfg: Config, run_dir: Path | str) -> None:
    """The config a run folder was made with (compared by ``finished_run``); written after
    summary.json, it marks the run complete for this config."""
    write_json(store_fs.as_location(run_dir) / "config.json", config_to_dict(cfg))


def write_complete_run(cfg: Config, run_dir: Path | str, write: Callable[[], T]) -> T:
    """``write()`` (the job's run-folder files, summary.json among them) between removing the
    completion markers (summary.json, config.json; local or URI, through ``store.fs``) and
    ``record_config``: until it returns, ``finished_run`` is False for every config.
    Returns what ``write`` returns."""
    run_dir = store_fs.as_location(run_dir)
    for name in COMPLETION_FILES:
        store_fs.remove_file(run_dir / name)
    written = write()
    record_config(cfg, run_dir)
    return written


# ---------------------------------------------------------------- same settings?

def require_same_settings(what: str, recorded: Any, wanted: Any, keys: Sequence[str] | None = None,
                          elsewhere: str = "output_dir") -> None:
    """Raise ConfigError when the settings ``recorded`` with ``what`` (a store's meta, a run
    folder's config.json) differ from ``wanted`` (``config.differing_settings``, over ``keys``
    when given): it names ``what``, the keys that differ, ``--force`` and another ``elsewhere``."""
    differ = differing_settings(recorded, wanted, keys)
    if differ:
        raise ConfigError(f"{what} was made with other settings ({', '.join(differ)} differ): "
                          f"run with --force to start afresh, or choose another {elsewhere}")


def run_settings(raw: Any) -> dict:
    """A recorded or current config dict as {dotted key: value} (``config.dotted_settings``,
    keys added since at their defaults: ``recorded_config``), ``config.LOCATION_KEYS`` left out: a
    moved run folder or dataset is the same settings."""
    if not isinstance(raw, dict):
        return {}
    return dotted_settings(without_locations(recorded_config(raw)))


def check_recorded_config(cfg: Config, run_dir: Path | str, what: str) -> bool:
    """Before anything runs: ConfigError (``require_same_settings``, naming the dotted keys)
    when ``run_dir``'s config.json records other settings than ``cfg``'s (``run_settings``);
    ``what`` names what the folder holds ("the sweep"). Returns whether a config was recorded."""
    path = store_fs.as_location(run_dir) / COMPLETION_FILES[1]
    if not store_fs.file_exists(path):
        return False
    try:
        recorded = read_json(path)
    except ValueError:
        raise ConfigError(f"{path}: not a readable config: run with --force to start afresh, "
                          "or choose another output_dir") from None
    require_same_settings(f"{what} in {run_dir}", run_settings(recorded), run_settings(config_to_dict(cfg)))
    return True
