"""A finished Tune sweep's trials as benchmark lines: one JSON object per trial on stdout.

    python benchmarks/sweep_rows.py RUN_DIR --name tune_tail_stage --command "python -m twa_ray tune ..." \
        [--note "under load: accuracies only"] > benchmarks/results/tune_tail_stage.jsonl

RUN_DIR is the sweep's output_dir (jobs/tune_twa.py writes tune_results.parquet and
best.json there). Each line carries the trial's parameters and metrics as the sweep wrote
them, plus the command, the date the sweep finished, this machine and ``best`` (whether the
sweep chose it). The sweeps behind configs/*.yaml defaults are recorded this way.
"""
from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq
from _common import emit, machine


def sweep_rows(run_dir: Path, name: str, command: str, note: str | None) -> list[dict]:
    results = run_dir / "tune_results.parquet"
    if not results.is_file():
        raise SystemExit(f"{results}: no such file (is {run_dir} a finished sweep's output_dir?)")
    best = json.loads((run_dir / "best.json").read_text())
    finished = datetime.fromtimestamp(results.stat().st_mtime, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    context = {"benchmark": "sweep_rows", "sweep": name, "date": finished, "command": command, "machine": machine(),
               **({"note": note} if note else {})}
    return [{**context, **row, "best": row["trial_id"] == best.get("trial_id")}
            for row in pq.read_table(results).to_pylist()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--name", required=True, help="the sweep's name in the lines (\"sweep\"), e.g. tune_tail_stage")
    parser.add_argument("--command", required=True, help="the command that ran the sweep")
    parser.add_argument("--note", default=None, help="how to read the lines, e.g. taken under load")
    args = parser.parse_args(argv)
    for row in sweep_rows(args.run_dir, args.name, args.command, args.note):
        emit(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
