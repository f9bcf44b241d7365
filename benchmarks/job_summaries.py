"""The README's two job summaries, measured: the quickstart's main job and the soup job, each
run as a user types it, one JSON line per job with its whole summary.json.

    python benchmarks/job_summaries.py [--jobs quickstart,soup] [--out benchmarks/results/job_summaries.jsonl]
    python benchmarks/job_summaries.py --results benchmarks/results/job_summaries.jsonl --readme README.md

A job's earlier line in --out is replaced, the other jobs' lines stay. Each job runs with ``--force`` (its run folder, runs/quickstart or runs/soup_quickstart, is made
again). ``--readme``: the quickstart's summary, shortened to the keys the README discusses,
replaces the block between QUICKSTART_BEGIN and QUICKSTART_END; nothing else is written there.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT, emit, machine, note, replace_block, utc_date, write_jsonl

JOBS = {  # name: (the command as a user types it, its run folder)
    "quickstart": (["python", "jobs/cifar_twa.py", "--config", "configs/quickstart.yaml", "--force"], "runs/quickstart"),
    "soup": (["python", "jobs/soup_twa.py", "--config", "configs/soup_quickstart.yaml", "--force"],
             "runs/soup_quickstart"),
}
QUICKSTART_BEGIN = "<!-- job_summaries.py quickstart: begin -->"
QUICKSTART_END = "<!-- job_summaries.py quickstart: end -->"
# the quickstart summary's keys the README shows, in this order
README_KEYS = ("config", "dataset", "model", "num_candidates", "bits", "granularity", "basis", "twa_data", "workers",
               "epochs", "test_acc", "trained_on", "swa_candidates", "best_k_candidates", "twa_includes_initial",
               "time_s", "cost_ratio", "wall_ratio", "twa_epoch_vs_sgd_epoch", "projection_bytes_per_worker")


def run_job(name: str) -> dict:
    """Run job ``name`` of JOBS in the repository; its JSON line."""
    command, run_dir = JOBS[name]
    note("running: " + " ".join(command))
    started = time.perf_counter()
    subprocess.run([sys.executable, *command[1:]], cwd=ROOT, check=True)
    wall = time.perf_counter() - started
    summary = json.loads((ROOT / run_dir / "summary.json").read_text())
    return {"benchmark": "job_summaries", "job": name, "command": " ".join(command), "date": utc_date(),
            "job_wall_s": round(wall, 1), "summary": summary, "machine": machine()}


def rounded(value, digits: int = 3):
    """``value`` with every float rounded to ``digits`` decimals (lists and dicts inside too)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


def readme_excerpt(line: dict) -> str:
    """The quickstart line's summary as the README shows it: README_KEYS that it has, floats
    rounded to 3 decimals, with the date, commit and wall time of the run above it."""
    summary = line["summary"]
    shown = {key: rounded(summary[key]) for key in README_KEYS if key in summary}
    m = line["machine"]
    return "\n".join([
        QUICKSTART_BEGIN,
        f"`{line['command']}`, {line['date']}, commit {m.get('git_commit') or 'not recorded'}, "
        f"{line['job_wall_s']:.0f} s in all (`benchmarks/results/job_summaries.jsonl`):",
        "", "```json", json.dumps(shown, indent=2), "```", QUICKSTART_END])


def write_readme(path: Path, lines: list[dict]) -> None:
    """Replace the quickstart block of ``path`` by the last quickstart line's ``readme_excerpt``;
    SystemExit naming the file when the markers or a quickstart line are missing."""
    from twa_ray.output.atomic import atomic_path

    quick = [line for line in lines if line["job"] == "quickstart"]
    if not quick:
        raise SystemExit("--readme: no quickstart line in the results")
    text = replace_block(path.read_text(), QUICKSTART_BEGIN, QUICKSTART_END, readme_excerpt(quick[-1]), path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default=",".join(JOBS), help=f"comma-separated: {','.join(JOBS)}")
    parser.add_argument("--out", default="benchmarks/results/job_summaries.jsonl")
    parser.add_argument("--results", default=None, help="a job_summaries.jsonl: run nothing, only write --readme")
    parser.add_argument("--readme", default=None, help="write the quickstart's summary into this file's block")
    args = parser.parse_args(argv)
    if args.results:
        lines = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.strip()]
    else:
        names = [name.strip() for name in args.jobs.split(",") if name.strip()]
        unknown = sorted(set(names) - set(JOBS))
        if unknown:
            parser.error(f"--jobs: {', '.join(unknown)} is no job (jobs: {', '.join(JOBS)})")
        out = ROOT / args.out
        kept = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []
        lines = [line for line in kept if line["job"] not in names]  # the other jobs' lines stay
        for name in names:
            lines.append(run_job(name))
            emit(lines[-1])
            write_jsonl(out, lines)
    if args.readme:
        write_readme(Path(args.readme), lines)
        note(f"wrote the quickstart summary into {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
