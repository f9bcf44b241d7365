"""The soup job: fine-tuned models -> candidate store -> TWA-v vs. best individual, uniform and greedy soup.

    twa-ray soup --config configs/soup_quickstart.yaml [a.b=value ...] [--force] [--verbose]
    twa-ray soup --config configs/soup_quickstart.yaml checkpoints_dir=PATH   # your own models
    twa-ray soup --config CONFIG --from DIR    # the same: DIR is any checkpoint folder, a Ray Train
                                               # run or a Ray Tune experiment (each trial's last model)
    python jobs/soup_twa.py --config configs/soup_quickstart.yaml       (the same, from a checkout)
    ray job submit --working-dir . -- python jobs/soup_twa.py --config configs/soup_quickstart.yaml

The fine-tuned models come from ``checkpoints_dir`` (a folder of state_dicts: {i}.pt,
model_{i}.pt, *.safetensors, Ray Train checkpoint folders) when it is set, else from
the ``finetune:`` section: pretrain once, fine-tune N copies with varied settings as
concurrent Ray tasks. TWA trains per-block coefficients on the val split (TWA-v); the
soups select on the val split too; the test split only scores the results.

Joins the Ray cluster in RAY_ADDRESS, else starts a local Ray on 127.0.0.1. A re-run of
a finished run folder with the same config does nothing; an interrupted one reuses the
fine-tuned models and imported store it finds, when they were made with the same settings
(else it stops before Ray starts, naming the keys that differ: --force starts afresh).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from ..config import Config, ConfigError
from ..output.console import setup_logging
from .common import add_job_arguments, finish, job_run_dir, load_job_config, report_errors, standalone

log = logging.getLogger(__name__)

HELP = "the soup job: TWA-v over fine-tuned models vs. best individual, uniform and greedy soup"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_job_arguments(parser, "configs/soup_quickstart.yaml",
                      overrides_help="config overrides a.b=value, e.g. checkpoints_dir=PATH")
    parser.add_argument("--from", dest="from_dir", metavar="DIR",
                        help="the models to average: a folder of checkpoints (any format twa_ray reads), a Ray "
                             "Train run or a Ray Tune experiment, e.g. a sweep's trials (checkpoints_dir=DIR)")


def _with_from(args: argparse.Namespace) -> argparse.Namespace:
    """``--from DIR`` as the override checkpoints_dir=DIR (absolute: the working directory's)."""
    if not getattr(args, "from_dir", None):
        return args
    if any(o.split("=", 1)[0] == "checkpoints_dir" for o in args.overrides):
        raise ConfigError("--from and checkpoints_dir= both name the models: give one")
    overrides = [*args.overrides, f"checkpoints_dir={Path(args.from_dir).expanduser().resolve()}"]
    return argparse.Namespace(**{**vars(args), "overrides": overrides})


def _check_soup_config(cfg: Config, path: str) -> None:
    from ..pipelines import soups
    from ..pipelines.runs import require_local_run_dir

    require_local_run_dir(cfg, "the soup job")
    problems = soups.soup_config_problems(cfg)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(f"{path}: {p}" for p in problems))


def command(args: argparse.Namespace) -> int:
    from ..pipelines.runs import check_inputs, finished_run
    from ..pipelines.soups import check_reuse

    setup_logging(args.verbose)
    try:
        args = _with_from(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    cfg = load_job_config(args, lambda c: _check_soup_config(c, args.config))
    if cfg is None:
        return 2
    if cfg.twa.data != "val":
        log.warning("twa.data=%r: the soup comparison is meant for TWA-v (twa.data=val)", cfg.twa.data)
    run_dir = job_run_dir(cfg, force=args.force)
    if run_dir is None:
        return 2
    if finished_run(cfg, run_dir):
        print(f"run folder: {run_dir} (already complete for this config; --force starts afresh)")
        return 0

    def job() -> int:
        # CheckpointError (a bad checkpoint folder) is a ValueError naming the file and key
        check_inputs(cfg)
        check_reuse(cfg, run_dir)  # fine-tuned models or a store of other settings: refused before Ray starts
        return run(cfg, run_dir, args.verbose)

    return report_errors(job)


def run(cfg: Config, run_dir: Path, verbose: bool = False) -> int:
    from ..runtime.ray_env import quiet_ray
    from ..pipelines import soups

    quiet_ray(verbose)  # Ray starts inside the stages, only once needed: as loud as asked
    started, times = time.perf_counter(), {}

    # 1. the fine-tuned models: a given folder, or pretrain + fine-tune as Ray tasks
    models = soups.fine_tuned_models(cfg, run_dir, times)

    # 2. the candidate store: one row per fine-tuned model (a bad folder fails here, before Ray starts)
    store_uri = soups.import_models(cfg, models, times)

    # 3. soups selected on val (a Ray task) while TWA-v trains on Ray Train
    selection, twa = soups.select_soups_and_train_twa(cfg, store_uri, times)

    # 4. test split: every model, the soups and TWA (BatchNorm recalibrated)
    results = soups.evaluate_all(cfg, store_uri, selection, twa, times)
    times["total"] = time.perf_counter() - started

    # 5. the run folder, then config.json: marks the run complete for this config
    summary = soups.write_run(cfg, run_dir, models, selection, twa, results, store_uri, times)
    finish(run_dir, summary, cfg.report.tensorboard)
    return 0


def main(argv: list[str] | None = None) -> int:
    return standalone(__doc__, add_arguments, command, argv)
