"""A run folder's life, the same for every job: made (or cleared by ``--force``), inputs
checked in the driver, a finished run of the same config found, and a complete run marked.

A run folder is complete when it holds ``summary.json`` (written last by
``output.run_folder``) and ``config.json`` (``record_config``) equal to the job's config.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from ..config import Config, config_to_dict, differing_settings
from ..data.from_config import splits_from_config
from ..models.from_config import model_from_config
from ..output.atomic import write_json

log = logging.getLogger(__name__)


def prepare_run_dir(cfg: Config, force: bool = False) -> Path:
    """Create the run folder; with ``force`` first remove what an earlier run left in it."""
    run_dir = Path(cfg.run_dir).resolve()
    if force and run_dir.exists():
        log.warning("--force: removing the earlier results in %s", run_dir)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def check_inputs(cfg: Config) -> None:
    """Fail early, in the driver, with the data/model errors workers would hit: a missing
    dataset (naming where it looked), a val_ratio giving an empty split, an unknown model."""
    splits = splits_from_config(cfg)
    model_from_config(cfg, splits)


def finished_run(cfg: Config, run_dir: Path) -> bool:
    """True when ``run_dir`` holds a complete run (summary.json) of exactly this config."""
    summary, recorded = run_dir / "summary.json", run_dir / "config.json"
    if not (summary.exists() and recorded.exists()):
        return False
    try:
        return not differing_settings(json.loads(recorded.read_text()), config_to_dict(cfg))
    except ValueError:
        return False


def record_config(cfg: Config, run_dir: Path) -> None:
    """The config a run folder was made with (compared by ``finished_run``); written after
    summary.json, it marks the run complete for this config."""
    write_json(run_dir / "config.json", config_to_dict(cfg))
