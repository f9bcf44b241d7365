"""What a TWA run leaves in its run folder (DESIGN.md section 7), for every job.

    summary.json          test accuracies of each method, epochs, start-up and compute
                          seconds per stage, cost ratios, sizes (written last)
    metrics.parquet       one row per epoch and stage
    coefficients.parquet  one row per candidate (and round): its epoch and step, X per block,
                          and α per block where the basis allows (``output.mixing``)
    model.pt              the TWA model's state_dict (BatchNorm recalibrated), plain torch
    plots/accuracy.png    val accuracy by epoch (base training, full budget) with each method's test
                          accuracy marked where it becomes available; a panel per compute second
    plots/mixing.png      how much each candidate contributes, candidates x blocks
    models/<name>.pt, models/<name>.safetensors  further state_dicts (the soup job's soups)
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..store import export_state_dict
from ..store import fs as store_fs
from .atomic import write_json, write_rows, write_torch
from .mixing import Mixing, mixing_rows, plot_mixing


def stage_rows(stage: str, history: Sequence[dict]) -> list[dict]:
    """Per-epoch metrics of one stage, tagged with the stage's name."""
    return [{"stage": stage, **{k: v for k, v in h.items() if isinstance(v, (int, float, str, bool)) or v is None}} for h in history]


def write_run_folder(
    run_dir: str | Path,
    summary: dict,
    metrics: Sequence[dict],
    mixing: Mixing,
    model_state: dict,
    plot_accuracy: Callable[[Path | store_fs.Uri], None],
    models: Mapping[str, dict] | None = None,
) -> list[Path | store_fs.Uri]:
    """Write every file of the run folder (each atomically); returns their paths.

    ``run_dir`` is a local folder or a URI (``s3://bucket/run``): the paths are then
    ``Path`` objects or ``store.fs.Uri`` strings, both joined with ``/``.

    ``mixing`` (``output.mixing.run_mixing``) gives coefficients.parquet and plots/mixing.png.
    ``plot_accuracy(path)`` draws plots/accuracy.png; ``models`` maps a name to a
    state_dict exported as models/<name>.pt and .safetensors. summary.json comes last:
    its presence marks a complete run folder, so an earlier run's summary.json is removed
    before the first file is written (a writer that dies half-way leaves none).
    """
    run_dir = store_fs.as_location(run_dir)
    store_fs.remove_file(run_dir / "summary.json")
    written = [run_dir / "model.pt", run_dir / "metrics.parquet", run_dir / "coefficients.parquet",
               run_dir / "plots" / "accuracy.png", run_dir / "plots" / "mixing.png"]
    write_torch(written[0], model_state)
    write_rows(written[1], metrics)
    write_rows(written[2], mixing_rows(mixing))
    plot_accuracy(written[3])
    plot_mixing(written[4], mixing)
    for name, state in (models or {}).items():
        written += [store_fs.as_location(p) for p in export_state_dict(state, run_dir / "models" / name)]
    write_json(run_dir / "summary.json", summary)
    return written + [run_dir / "summary.json"]
