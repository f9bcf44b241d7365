"""The main job: base training -> candidate store -> sharded TWA -> evaluation -> run folder.

    python jobs/cifar_twa.py --config configs/quickstart.yaml [a.b=value ...] [--force]
    ray job submit --working-dir . -- python jobs/cifar_twa.py --config configs/quickstart.yaml

Joins the Ray cluster in RAY_ADDRESS (as under ``ray job submit``), else starts a local
Ray on 127.0.0.1. Candidates already in the store for the same config are reused.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from twa_ray.config import ConfigError, config_to_dict, load_config  # noqa: E402
from twa_ray.pipeline import (  # noqa: E402
    candidate_curve,
    check_inputs,
    ensure_candidates,
    evaluate_run,
    finished_run,
    prepare_run_dir,
    record_config,
    twa_summary,
)
from twa_ray.ray_env import init_ray  # noqa: E402
from twa_ray.run_report import stage_rows, write_run_folder  # noqa: E402

log = logging.getLogger("cifar_twa")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/quickstart.yaml")
    parser.add_argument("--force", action="store_true", help="start afresh: discard this run folder's earlier results")
    parser.add_argument("overrides", nargs="*", help="config overrides a.b=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    run_dir = prepare_run_dir(cfg, force=args.force)
    if finished_run(cfg, run_dir):
        print(f"run folder: {run_dir} (already complete for this config; --force starts afresh)")
        return 0
    try:
        check_inputs(cfg)
        return run(cfg, run_dir)
    except (ValueError, FileNotFoundError, FloatingPointError) as exc:
        log.debug("details", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 1


def run(cfg, run_dir: Path) -> int:
    init_ray()
    from twa_ray.distributed.base_train import run_full_budget_training
    from twa_ray.distributed.twa_train import run_twa

    # 1. candidates: base training on Ray Train (or the store it already filled)
    base = ensure_candidates(cfg)
    log.info("candidates: %d in %s", base.num_candidates, base.store_uri)

    # 2. TWA on cfg.twa.workers Ray Train workers, each with a column shard of Q
    twa = run_twa(cfg, base.store_uri)

    # 3. optional full-budget SGD for the time-to-accuracy comparison
    full = None
    if cfg.compare_full_budget:
        full = run_full_budget_training(cfg)

    # 4. test-split evaluation: every candidate, last, SWA, TWA (+ full budget)
    results = evaluate_run(cfg, base.store_uri, twa, full)

    # 5. the run folder
    summary = twa_summary(cfg, base, twa, full, results)
    metrics = stage_rows("base_train", base.metrics) + stage_rows("twa", twa.history)
    if full is not None:
        metrics += stage_rows("full_budget", full.metrics)
    write_run_folder(
        run_dir, summary, metrics, twa.coefficients, twa.rounds, twa.block_names,
        results["twa"].state_dict, candidate_curve(base.store_uri, results),
    )
    record_config(cfg, run_dir)  # with summary.json: marks the run complete for this config
    log.info("test accuracy: last %.2f%%, SWA %.2f%%, TWA %.2f%%", *(summary["test_acc"][k] for k in ("last", "swa", "twa")))
    log.info("run folder: %s (config %s)", run_dir, config_to_dict(cfg)["name"])
    print(f"run folder: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
