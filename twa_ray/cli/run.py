"""The main job: base training -> candidate store -> sharded TWA -> evaluation -> run folder.

    twa-ray run --config configs/quickstart.yaml [a.b=value ...] [--force] [--verbose]
    python jobs/cifar_twa.py --config configs/quickstart.yaml           (the same, from a checkout)
    ray job submit --working-dir . -- python jobs/cifar_twa.py --config configs/quickstart.yaml

Joins the Ray cluster in RAY_ADDRESS (as under ``ray job submit``), else starts a local
Ray on 127.0.0.1. Candidates already in the store for the same config are reused.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..config import Config
from ..output.console import setup_logging
from .common import add_job_arguments, finish, job_run_dir, load_job_config, report_errors, standalone

log = logging.getLogger(__name__)

HELP = "the main job: base training, sharded TWA, evaluation, run folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_job_arguments(parser, "configs/quickstart.yaml")


def command(args: argparse.Namespace) -> int:
    from ..pipelines.main import check_candidate_count, check_store_settings
    from ..pipelines.runs import check_inputs, finished_run

    setup_logging(args.verbose)
    cfg = load_job_config(args)
    if cfg is None:
        return 2
    run_dir = job_run_dir(cfg, force=args.force)
    if run_dir is None:
        return 2
    if finished_run(cfg, run_dir):
        print(f"run folder: {run_dir} (already complete for this config; --force starts afresh)")
        return 0

    def job() -> int:
        splits = check_inputs(cfg)
        check_candidate_count(cfg, len(splits.train))  # before base training, which may take hours
        check_store_settings(cfg)  # a store of other candidates: refused before Ray starts
        return run(cfg, run_dir, args.verbose)

    return report_errors(job)


def run(cfg: Config, run_dir: Path, verbose: bool = False) -> int:
    from ..runtime.ray_env import init_ray
    from ..pipelines import main as pipeline

    init_ray(verbose=verbose)

    # 1. candidates: base training on Ray Train (or the store it already filled)
    base = pipeline.ensure_candidates(cfg)
    log.info("candidates: %d in %s", base.num_candidates, base.store_uri)

    # 2. TWA on cfg.twa.workers Ray Train workers, each with a column shard of Q
    twa = pipeline.train_twa(cfg, base)

    # 3. optional: base training continued to the end of its schedule (None unless compare_full_budget)
    full = pipeline.train_full_budget(cfg, base)
    # ... and with it SGD at equal compute: base training continued for TWA's epochs, schedule compressed
    same = pipeline.train_sgd_same_compute(cfg, base, twa)

    # 4. test-split evaluation in parallel tasks: last, SWA, EMA, best-k, TWA (+ full budget, SGD same compute)
    results = pipeline.evaluate_run(cfg, base, twa, full, same)

    # 5. the run folder, then config.json: marks the run complete for this config
    summary = pipeline.write_run(cfg, run_dir, base, twa, full, results, same)
    finish(run_dir, summary, cfg.report.tensorboard)
    return 0


def main(argv: list[str] | None = None) -> int:
    return standalone(__doc__, add_arguments, command, argv)
