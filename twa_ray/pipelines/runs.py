"""A run folder's life, the same for every job: made (or cleared by ``--force``), inputs
checked in the driver, a finished run of the same config found, and a complete run marked.

A run folder is complete when it holds ``summary.json`` (written last by
``output.run_folder``) and ``config.json`` (``record_config``) equal to the job's config.

A run folder is a local folder (a ``Path``) or a URI (``s3://bucket/run``: a
``store.fs.Uri``); both join with ``/``, and every file goes through ``store.fs``.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..config import Config, ConfigError, config_to_dict, differing_settings, recorded_config
from ..data import DataSplits
from ..data.from_config import splits_from_config
from ..models.from_config import model_from_config
from ..output.atomic import read_json, write_json
from ..store import fs as store_fs

log = logging.getLogger(__name__)


def prepare_run_dir(cfg: Config, force: bool = False) -> Path | store_fs.Uri:
    """The run folder (made when local: an object store has no folders); with ``force``
    first remove what an earlier run left in it."""
    run_dir = store_fs.as_location(cfg.run_dir)
    if isinstance(run_dir, Path):
        run_dir = run_dir.resolve()
    if force and store_fs.remove_tree(run_dir):
        log.warning("--force: removed the earlier results in %s", run_dir)
    if isinstance(run_dir, Path):
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def require_local_run_dir(cfg: Config, job: str) -> None:
    """ConfigError naming output_dir when it is a URI: ``job`` (the soup and tune jobs) keeps
    its run folder on a local or mounted shared path (it appends to logs, and libraries
    read its files by local path); the main job takes any URI."""
    if store_fs.is_uri(cfg.run_dir):
        raise ConfigError(f"output_dir: {cfg.run_dir!r} is a URI; {job} writes its run folder to a local path "
                          "(on a cluster an absolute path every node shares); the main job (twa-ray run) takes URIs")


def check_inputs(cfg: Config) -> DataSplits:
    """Fail early, in the driver, with the data/model errors workers would hit: a missing
    dataset (naming where it looked), a val_ratio giving an empty split, an unknown model.
    Returns the splits it loaded (test sealed)."""
    splits = splits_from_config(cfg)
    model_from_config(cfg, splits)
    return splits


def finished_run(cfg: Config, run_dir: Path | str) -> bool:
    """True when ``run_dir`` holds a complete run (summary.json) of exactly this config."""
    run_dir = store_fs.as_location(run_dir)
    summary, recorded = run_dir / "summary.json", run_dir / "config.json"
    if not (store_fs.file_exists(summary) and store_fs.file_exists(recorded)):
        return False
    try:
        return not differing_settings(recorded_config(read_json(recorded)), config_to_dict(cfg))
    except ValueError:
        return False


def record_config(cfg: Config, run_dir: Path | str) -> None:
    """The config a run folder was made with (compared by ``finished_run``); written after
    summary.json, it marks the run complete for this config."""
    write_json(store_fs.as_location(run_dir) / "config.json", config_to_dict(cfg))
