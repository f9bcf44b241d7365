"""The ``twa-ray`` command line (also ``python -m twa_ray``): one subcommand per job, and tools.

    twa-ray run --config configs/quickstart.yaml [a.b=value ...]      the main job
    twa-ray tune --config configs/tune_quickstart.yaml                 a Ray Tune sweep
    twa-ray soup --config configs/soup_quickstart.yaml                 TWA-v vs. model soups
    twa-ray train-candidates --config configs/quickstart.yaml          base training only
    twa-ray plan --model resnet18 --candidates 20 --bits 4             memory and traffic, before a run
    twa-ray show runs/quickstart                                       a finished run's results table
    twa-ray export runs/quickstart --format safetensors                the TWA model in another format

The job commands take the same flags as ``jobs/*.py`` (which call them), so
``ray job submit ... python jobs/cifar_twa.py ...`` and ``twa-ray run ...`` do the same.
"""
from __future__ import annotations

import argparse
from types import ModuleType

from . import export, plan, run, show, soup, train_candidates, tune

# subcommand -> module with HELP, add_arguments(parser) and command(args) -> exit status
COMMANDS: dict[str, ModuleType] = {
    "run": run, "tune": tune, "soup": soup, "train-candidates": train_candidates,
    "plan": plan, "show": show, "export": export,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="twa-ray", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        sub = commands.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.__doc__),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: sys.argv[1:]) and run the subcommand; returns its exit status."""
    args = build_parser().parse_args(argv)
    return args.run(args)
