"""A sweep's run-folder files: tune_results.parquet, best.json, plots/tune.png."""
from __future__ import annotations

from pathlib import Path

from ..plots import plot_sweep
from ..run_folder import write_json, write_rows


def write_sweep_outputs(run_dir: str | Path, sweep, metric: str) -> None:
    run_dir = Path(run_dir)
    write_rows(run_dir / "tune_results.parquet", sweep.rows)
    plot_sweep(run_dir / "plots" / "tune.png", sweep.rows, f"final_{metric}")
    write_json(run_dir / "best.json", {k: v for k, v in sweep.best.items() if k != "checkpoint_path"})
