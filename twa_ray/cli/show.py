"""A finished run's results table (method, test accuracy and loss, epochs, compute seconds,
what it trained on) from its summary.json.

    twa-ray show runs/quickstart
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..output.console import results_table
from ..output.export import read_summary
from ..output.report import model_files

HELP = "print the results table of a finished run folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder, e.g. runs/quickstart")


def command(args: argparse.Namespace) -> int:
    try:
        summary = read_summary(args.run_dir)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(results_table(summary))
    for path in model_files(args.run_dir):
        print(f"model:  {Path(args.run_dir) / path}")
    return 0
