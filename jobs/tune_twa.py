"""Ray Tune sweep over TWA settings: subspace size, coefficient learning rate, optimizer, bits...

    python jobs/tune_twa.py --config configs/tune_quickstart.yaml [a.b=value ...] [--force]
    ray job submit --working-dir . -- python jobs/tune_twa.py --config configs/tune_quickstart.yaml

Candidates are made once (base training, or the store already there) and read by every
trial. Running the same command again resumes an interrupted sweep.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from twa_ray.config import ConfigError, config_to_dict, load_config  # noqa: E402
from twa_ray.pipeline import ensure_candidates, prepare_run_dir  # noqa: E402
from twa_ray.ray_env import init_ray  # noqa: E402
from twa_ray.tune.report import write_sweep_outputs  # noqa: E402
from twa_ray.tune.search_space import apply_params, validate_space  # noqa: E402

log = logging.getLogger("tune_twa")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config with a tune: section")
    parser.add_argument("--force", action="store_true", help="discard this run folder's earlier results")
    parser.add_argument("overrides", nargs="*", help="config overrides a.b=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        validate_space(cfg)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    run_dir = prepare_run_dir(cfg, force=args.force)

    init_ray(dashboard=True)  # ASHA's early stops free Train resources through the State API
    from twa_ray.distributed.evaluate import evaluate_on_ray
    from twa_ray.tune.sweep import best_weights, run_sweep

    # 1. candidates, made once and shared read-only by every trial
    base = ensure_candidates(cfg)

    # 2. the sweep: each trial runs sharded TWA on Ray Train; ASHA stops poor trials
    sweep = run_sweep(cfg, base.store_uri)

    # 3. the test split, read once: the best trial's final weights
    best_cfg = apply_params(config_to_dict(cfg), sweep.best["params"])
    result = evaluate_on_ray(best_cfg, {"twa": best_weights(sweep.best)}, None, str(Path.cwd()))["twa"]
    sweep.best["test_acc"] = result.accuracy

    write_sweep_outputs(run_dir, sweep, cfg.tune.metric)
    log.info("best trial %s: %s=%.4g, test accuracy %.2f%%, params %s", sweep.best["trial_id"],
             cfg.tune.metric, sweep.best["selection_metric"], result.accuracy, sweep.best["params"])
    print(f"run folder: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
