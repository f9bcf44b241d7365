"""What a TWA run leaves in its run folder (DESIGN.md section 7).

    summary.json          accuracies of last candidate, SWA, TWA (and full budget), times, sizes
    metrics.parquet       one row per epoch and stage
    coefficients.parquet  one row per candidate (and round), one column per block
    model.pt              the TWA model's state_dict (BatchNorm recalibrated), plain torch
    plots/accuracy.png    test accuracy per base-training epoch with SWA and TWA marked
    plots/coefficients.png  heatmap of the coefficients, candidates x blocks
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .plots import plot_accuracy, plot_coefficients
from .run_folder import write_json, write_rows, write_torch


def coefficient_rows(coefficients: Sequence[torch.Tensor], rounds: Sequence[Sequence[int]], block_names: Sequence[str]) -> list[dict]:
    """One row per (round, candidate): {'round', 'candidate', <block name>: coefficient, ...}."""
    rows = []
    for r, (x, indices) in enumerate(zip(coefficients, rounds)):
        for i, cand in enumerate(indices):
            row = {"round": r, "candidate": int(cand)}
            row.update({name: float(v) for name, v in zip(block_names, x[i].tolist())})
            rows.append(row)
    return rows


def stage_rows(stage: str, history: Sequence[dict]) -> list[dict]:
    """Per-epoch metrics of one stage, tagged with the stage's name."""
    return [{"stage": stage, **{k: v for k, v in h.items() if isinstance(v, (int, float, str, bool)) or v is None}} for h in history]


def write_run_folder(
    run_dir: str | Path,
    summary: dict,
    metrics: Sequence[dict],
    coefficients: Sequence[torch.Tensor],
    rounds: Sequence[Sequence[int]],
    block_names: Sequence[str],
    model_state: dict,
    candidate_curve: tuple[Sequence[float], Sequence[float]],
) -> list[Path]:
    """Write every file of the run folder (each atomically); returns their paths."""
    run_dir = Path(run_dir)
    paths = {
        "model": run_dir / "model.pt",
        "metrics": run_dir / "metrics.parquet",
        "coefficients": run_dir / "coefficients.parquet",
        "accuracy": run_dir / "plots" / "accuracy.png",
        "heatmap": run_dir / "plots" / "coefficients.png",
        "summary": run_dir / "summary.json",
    }
    write_torch(paths["model"], model_state)
    write_rows(paths["metrics"], metrics)
    write_rows(paths["coefficients"], coefficient_rows(coefficients, rounds, block_names))
    acc = summary.get("test_acc", {})
    plot_accuracy(paths["accuracy"], candidate_curve[0], candidate_curve[1],
                  {"swa": acc.get("swa"), "twa": acc.get("twa"), "full budget": acc.get("full_budget")})
    last = len(coefficients) - 1
    plot_coefficients(paths["heatmap"], coefficients[last], [f"cand {c}" for c in rounds[last]], block_names)
    write_json(paths["summary"], summary)  # last: its presence marks a complete run folder
    return list(paths.values())
