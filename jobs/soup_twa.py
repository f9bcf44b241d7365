"""The soup job: fine-tuned models -> candidate store -> TWA-v vs. best individual, uniform and greedy soup.

    python jobs/soup_twa.py --config configs/soup_quickstart.yaml [a.b=value ...] [--force]
    python jobs/soup_twa.py --config configs/soup_quickstart.yaml checkpoints_dir=PATH   # your own models
    ray job submit --working-dir . -- python jobs/soup_twa.py --config configs/soup_quickstart.yaml

The fine-tuned models come from ``checkpoints_dir`` (a folder of state_dicts: {i}.pt,
model_{i}.pt, *.safetensors, Ray Train checkpoint folders) when it is set, else from
the ``finetune:`` section: pretrain once, fine-tune N copies with varied settings as
concurrent Ray tasks. TWA trains per-block coefficients on the val split (TWA-v); the
soups select on the val split too; the test split only scores the results.

Joins the Ray cluster in RAY_ADDRESS, else starts a local Ray on 127.0.0.1. A re-run of
a finished run folder with the same config does nothing; an interrupted one reuses the
fine-tuned models and imported store it finds.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from twa_ray.config import ConfigError, load_config  # noqa: E402
from twa_ray.pipeline import check_inputs, finished_run, prepare_run_dir, record_config  # noqa: E402
from twa_ray.ray_env import init_ray  # noqa: E402
from twa_ray.run_report import stage_rows  # noqa: E402
from twa_ray.soup_pipeline import (  # noqa: E402
    evaluate_soups,
    import_candidates,
    make_finetuned,
    soup_config_problems,
    soup_summary,
    start_soup_selection,
    write_soup_run_folder,
)

log = logging.getLogger("soup_twa")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/soup_quickstart.yaml")
    parser.add_argument("--force", action="store_true", help="start afresh: discard this run folder's earlier results")
    parser.add_argument("overrides", nargs="*", help="config overrides a.b=value, e.g. checkpoints_dir=PATH")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
        problems = soup_config_problems(cfg)
        if problems:
            raise ConfigError("invalid config:\n  " + "\n  ".join(f"{args.config}: {p}" for p in problems))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if cfg.twa.data != "val":
        log.warning("twa.data=%r: the soup comparison is meant for TWA-v (twa.data=val)", cfg.twa.data)
    run_dir = prepare_run_dir(cfg, force=args.force)
    if finished_run(cfg, run_dir):
        print(f"run folder: {run_dir} (already complete for this config; --force starts afresh)")
        return 0
    try:
        check_inputs(cfg)
        return run(cfg, run_dir)
    except (ValueError, FileNotFoundError, NotADirectoryError, FloatingPointError) as exc:
        # CheckpointError (a bad checkpoint folder) is a ValueError naming the file and key
        log.debug("details", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 1


def run(cfg, run_dir: Path) -> int:
    started = time.perf_counter()

    # 1. the fine-tuned models: a given folder, or pretrain + fine-tune as Ray tasks
    finetuned, times = None, {}
    if cfg.checkpoints_dir is not None:
        folder = cfg.checkpoints_dir
        if cfg.finetune is not None:
            log.info("checkpoints_dir is set: using %s, the finetune section is ignored", folder)
    else:
        init_ray()
        finetuned = make_finetuned(cfg, run_dir)
        folder, times = finetuned.folder, dict(finetuned.time_s)

    # 2. the candidate store: one row per fine-tuned model (a bad folder fails here, before Ray starts)
    t0 = time.perf_counter()
    store_uri = import_candidates(cfg, folder)
    times["import"] = time.perf_counter() - t0

    # 3. soups selected on val (a Ray task) while TWA-v trains on Ray Train
    init_ray()  # joins or starts Ray once
    import ray

    from twa_ray.distributed.twa_train import run_twa

    selecting = start_soup_selection(cfg, store_uri)
    twa = run_twa(cfg, store_uri)
    selection = ray.get(selecting)
    times.update(twa=twa.wall_time_s, twa_in_workers=twa.time_s, soups=selection.time_s)

    # 4. test split: every model, the soups and TWA (BatchNorm recalibrated)
    t0 = time.perf_counter()
    results = evaluate_soups(cfg, store_uri, selection, twa.weights)
    times["evaluate"] = time.perf_counter() - t0
    times["total"] = time.perf_counter() - started

    # 5. the run folder
    summary = soup_summary(cfg, finetuned, selection, twa, results, store_uri, times)
    metrics = stage_rows("twa", twa.history) + stage_rows("soups", selection.soups["greedy_soup"].trace)
    if finetuned is not None:
        metrics = (stage_rows("pretrain", finetuned.pretrain["history"]) + stage_rows("finetune", finetuned.models)
                   + metrics)
    write_soup_run_folder(run_dir, summary, metrics, twa, results, selection)
    record_config(cfg, run_dir)  # with summary.json: marks the run complete for this config
    acc = summary["test_acc"]
    log.info("test accuracy: best individual %.2f%%, uniform soup %.2f%%, greedy soup %.2f%%, TWA %.2f%% (%.0f s)",
             acc["best_individual"], acc["uniform_soup"], acc["greedy_soup"], acc["twa"], times["total"])
    print(f"run folder: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
