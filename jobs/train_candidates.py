"""Base training only: train a model on Ray Train and fill the candidate store.

    python jobs/train_candidates.py --config configs/quickstart.yaml [train.epochs=2 ...]
    ray job submit --working-dir . -- python jobs/train_candidates.py --config configs/quickstart.yaml

Joins the Ray cluster in RAY_ADDRESS, or starts a local Ray. A re-run with the same
config resumes the run (Ray Train checkpoints under <run_dir>/ray) and adds no duplicate
candidates. ``compare_full_budget: true`` also trains for the whole budget into a
separate store (<run_dir>/full_budget_candidates).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from twa_ray.config import ConfigError, load_config  # noqa: E402
from twa_ray.distributed.base_train import run_base_training, run_full_budget_training  # noqa: E402
from twa_ray.ray_env import init_ray  # noqa: E402

log = logging.getLogger("train_candidates")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/quickstart.yaml")
    parser.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE, e.g. train.epochs=2")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2

    # setup
    init_ray()

    # train
    result = run_base_training(cfg)
    last = result.metrics[-1] if result.metrics else {}
    print(f"candidate store: {result.store_uri}")
    print(f"candidates: {result.num_candidates} (epochs run: {len(result.metrics)}, "
          f"last train acc: {last.get('train_acc', float('nan')):.2f}%, "
          f"last val acc: {last.get('val_acc', float('nan')):.2f}%, wall time: {result.wall_time_s:.1f} s)")
    print(f"ray train run: {result.run_path}")

    if cfg.compare_full_budget:
        full = run_full_budget_training(cfg)
        print(f"full-budget candidate store: {full.store_uri} ({full.num_candidates} candidates, "
              f"{full.wall_time_s:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
