"""Base training only: train a model on Ray Train and fill the candidate store.

    twa-ray train-candidates --config configs/quickstart.yaml [train.epochs=2 ...] [--force] [--verbose]
    python jobs/train_candidates.py --config configs/quickstart.yaml    (the same, from a checkout)
    ray job submit --working-dir . -- python jobs/train_candidates.py --config configs/quickstart.yaml

Joins the Ray cluster in RAY_ADDRESS, or starts a local Ray. A re-run with the same
config resumes the run (Ray Train checkpoints under <run_dir>/ray) and adds no duplicate
candidates; one whose store was made with other settings is refused before Ray starts,
naming the sections that differ (--force starts afresh). ``compare_full_budget: true``
then continues base training to the end of its schedule (the full budget; no candidates
kept).
"""
from __future__ import annotations

import argparse
import logging

from ..config import Config
from ..output.console import setup_logging
from .common import add_job_arguments, job_run_dir, load_job_config, report_errors, standalone

log = logging.getLogger(__name__)

HELP = "base training only: train on Ray Train and fill the candidate store"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_job_arguments(parser, "configs/quickstart.yaml",
                      overrides_help="config overrides KEY=VALUE, e.g. train.epochs=2")


def command(args: argparse.Namespace) -> int:
    from ..pipelines.main import check_store_settings

    setup_logging(args.verbose)
    cfg = load_job_config(args)
    if cfg is None:
        return 2
    run_dir = job_run_dir(cfg, force=args.force)
    if run_dir is None:
        return 2

    def job() -> int:
        check_store_settings(cfg)  # a store of other candidates: refused before Ray starts
        return run(cfg, args.verbose)

    return report_errors(job)


def run(cfg: Config, verbose: bool = False) -> int:
    from ..runtime.base_train import run_base_training, run_full_budget_training
    from ..runtime.ray_env import init_ray

    # setup
    init_ray(verbose=verbose)

    # train
    result = run_base_training(cfg)
    last = result.metrics[-1] if result.metrics else {}
    print(f"candidate store: {result.store_uri}")
    print(f"candidates: {result.num_candidates} (epochs run: {len(result.metrics)}, "
          + "".join(f"last {k.replace('_', ' ')}: {v:.4g}, " for k, v in last.items()
                    if k.startswith(("train_", "val_")) and isinstance(v, float))
          + f"wall time: {result.wall_time_s:.1f} s)")
    print(f"ray train run: {result.run_path}")

    if cfg.compare_full_budget:
        full = run_full_budget_training(cfg, result)
        print(f"full budget: {len(full.metrics)} more epochs to epoch {cfg.train.schedule_epochs} "
              f"({full.wall_time_s:.1f} s), final checkpoint: {full.checkpoint_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return standalone(__doc__.split("\n\n")[0], add_arguments, command, argv)
