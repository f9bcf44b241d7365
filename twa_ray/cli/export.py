"""The TWA model of a finished run (model.pt, a plain state_dict) in another format.

    twa-ray export runs/quickstart --format safetensors               -> runs/quickstart/model.safetensors
    twa-ray export runs/quickstart --format pt --out /tmp/twa.pt

Load it without twa_ray: ``safetensors.torch.load_file(path)`` or
``torch.load(path, weights_only=True)``, then ``model.load_state_dict(...)``; or, with
twa_ray, ``twa_ray.load_model(run_dir)`` builds the model too.
"""
from __future__ import annotations

import argparse
import sys

from ..output.export import export_model
from ..store.exporters import EXPORT_FORMATS

HELP = "write a finished run's TWA model as .safetensors or .pt"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder (holding model.pt)")
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS, help="file format")
    parser.add_argument("--out", help="where to write it (default RUN_DIR/model.FORMAT)")


def command(args: argparse.Namespace) -> int:
    try:
        path = export_model(args.run_dir, args.format, args.out)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0
