"""The char-level LM example (examples/char_lm.py) through the main job: test perplexity of
last, SWA, EMA, best-k, TWA, SGD at equal compute and the full budget, as one JSON line.

    python benchmarks/char_lm.py [--out benchmarks/results/char_lm.jsonl] [--work runs/char_lm_bench] [overrides ...]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT, emit, machine, utc_date, write_jsonl

CONFIG = "examples/char_lm.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/char_lm.jsonl")
    parser.add_argument("--work", default="runs/char_lm_bench", help="the job's run folder")
    parser.add_argument("overrides", nargs="*", help="config overrides a.b=value (e.g. seed=1)")
    args = parser.parse_args(argv)
    command = [sys.executable, "-m", "twa_ray", "run", "--config", CONFIG, f"output_dir={args.work}", *args.overrides]
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    summary = json.loads((ROOT / args.work / "summary.json").read_text())
    record = {
        "benchmark": "char_lm", "date": utc_date(), "config": CONFIG, "overrides": args.overrides,
        "invocation": " ".join(["python", "benchmarks/char_lm.py", *sys.argv[1:]]),
        "metric": summary["metric"], "test_ppl": summary["test_ppl"], "test_loss": summary["test_loss"],
        "epochs": summary["epochs"], "cost_ratio": summary["cost_ratio"], "time_s": summary["time_s"],
        "job_wall_s": round(time.perf_counter() - started, 1), "machine": machine(),
    }
    emit(record)
    write_jsonl(ROOT / args.out, [record])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
