"""A sweep's run-folder files: tune_results.parquet, best.json, plots/tune.png (and, with
``report.tensorboard``, TensorBoard event files per trial)."""
from __future__ import annotations

import json
from pathlib import Path

from ..output.atomic import write_json, write_rows
from ..output.plots import plot_sweep
from ..output.tensorboard import write_sweep_events

def candidates_labels(rows: list[dict]) -> dict[str, dict]:
    """tune.png's tick labels of ``twa.candidates`` values: the spec and the subspace size."""
    return {"twa.candidates": {str(r["twa.candidates"]): f"{r['twa.candidates']} (n={r['subspace_size']})"
                               for r in rows if "twa.candidates" in r and r.get("subspace_size") is not None}}


def trial_histories(run_dir: str | Path) -> dict[str, list[dict]]:
    """The per-epoch history of each finished trial, from its record in ``tune_trials/``."""
    from .sweep import RECORDS

    histories = {}
    for path in sorted((Path(run_dir) / RECORDS).glob("*.json")):
        record = json.loads(path.read_text())
        histories[str(record["trial_id"])] = record.get("history") or []
    return histories


def write_sweep_outputs(run_dir: str | Path, sweep, metric: str, tensorboard: bool = False) -> None:
    """tune_results.parquet (a row per trial), best.json, plots/tune.png: the final ``metric``
    against each swept parameter, the best trial marked; with ``tensorboard`` the trials'
    event files under tensorboard/."""
    run_dir = Path(run_dir)
    params = list(sweep.best["params"])
    write_rows(run_dir / "tune_results.parquet", sweep.rows)
    plot_sweep(run_dir / "plots" / "tune.png", sweep.rows, f"final_{metric}", params,
               best_trial=sweep.best["trial_id"], labels=candidates_labels(sweep.rows))
    write_json(run_dir / "best.json", {k: v for k, v in sweep.best.items() if k != "checkpoint_path"})
    if tensorboard:
        write_sweep_events(run_dir, sweep.rows, trial_histories(run_dir), params, f"final_{metric}")
