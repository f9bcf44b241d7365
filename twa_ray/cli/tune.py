"""Ray Tune sweep over TWA settings: subspace size, coefficient learning rate, optimizer, bits...

    twa-ray tune --config configs/tune_quickstart.yaml [a.b=value ...] [--force] [--verbose]
    python jobs/tune_twa.py --config configs/tune_quickstart.yaml       (the same, from a checkout)
    ray job submit --working-dir . -- python jobs/tune_twa.py --config configs/tune_quickstart.yaml

Candidates are made once (base training, or the store already there) and read by every
trial. The sweep's config is recorded in the run folder (config.json) before its first
trial; running the same command again resumes an interrupted sweep, and a rerun with
other settings is refused before Ray starts, naming the keys that differ (--force starts
a new sweep, or choose another output_dir).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..config import Config
from ..output.console import setup_logging
from ..output.report import write_report
from ..tune.report import write_sweep_outputs
from ..tune.search_space import validate_space
from .common import add_job_arguments, job_run_dir, load_job_config, report_errors, standalone

log = logging.getLogger(__name__)

HELP = "a Ray Tune sweep over TWA settings on one shared candidate store"

SWEEP = "the sweep"  # what a tune run folder holds, in errors


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_job_arguments(parser, "configs/tune_quickstart.yaml (with a tune: section)")


def command(args: argparse.Namespace) -> int:
    from ..pipelines.main import check_store_settings
    from ..pipelines.runs import check_recorded_config, require_local_run_dir
    from ..tune.search_space import settle_objective

    setup_logging(args.verbose)
    cfg = load_job_config(args, lambda c: (validate_space(c), require_local_run_dir(c, "the tune job")))
    if cfg is None:
        return 2
    run_dir = job_run_dir(cfg, force=args.force)
    if run_dir is None:
        return 2

    def job() -> int:
        settled = settle_objective(cfg)  # tune.metric / mode from the task, in the driver
        # Tune would restore a sweep of other settings (its search space, samples, ASHA) as this one
        check_recorded_config(settled, run_dir, SWEEP)
        check_store_settings(settled)  # a store of other candidates
        return run(settled, run_dir, args.verbose)

    return report_errors(job)


def run(cfg: Config, run_dir: Path, verbose: bool = False) -> int:
    from ..runtime.ray_env import init_ray
    from ..pipelines.main import ensure_candidates
    from ..pipelines.runs import record_config
    from ..pipelines.sweep import evaluate_best_trial

    init_ray(dashboard=True, verbose=verbose)  # ASHA's early stops free Train resources through the State API
    from ..tune.sweep import run_sweep  # imports Ray: after init_ray

    # 1. candidates, made once and shared read-only by every trial
    base = ensure_candidates(cfg)

    # 2. the sweep: each trial runs sharded TWA on Ray Train; ASHA stops poor trials. Its config
    # is recorded first: a rerun resumes it only with the same settings
    record_config(cfg, run_dir)
    sweep = run_sweep(cfg, base.store_uri, verbose=verbose)  # Tune's trial tables only with --verbose

    # 3. the test split, read once: the best trial's final weights
    result = evaluate_best_trial(cfg, sweep)

    # 4. the run folder: tune_results.parquet, best.json, plots/tune.png (+ TensorBoard events)
    write_sweep_outputs(run_dir, sweep, cfg.tune.metric, tensorboard=cfg.report.tensorboard)
    print(f"report: {write_report(run_dir)}")
    log.info("best trial %s: %s=%.4g, test %s %.4g, params %s", sweep.best["trial_id"],
             cfg.tune.metric, sweep.best["selection_metric"], result.metric, result.value, sweep.best["params"])
    print(f"run folder: {run_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return standalone(__doc__, add_arguments, command, argv)
