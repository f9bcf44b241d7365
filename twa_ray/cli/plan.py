"""The capacity planner: memory per worker and traffic per step of sharded TWA, before launching anything.

    twa-ray plan --model resnet18 --candidates 20 --bits 4 --workers 2
    twa-ray plan --model wrn28_10 --dataset cifar100 --candidates 50 --bits 2 \\
        --workers 4 --granularity size:1000000 --json
    python -m twa_ray.planner.llama llama7b.json      # a 7B Llama-like model's parameter shapes
    twa-ray plan --model llama7b.json --candidates 50 --bits 2 --workers 64

Both modes side by side: twa.sharding blocks (a model replica per worker) and fsdp (FSDP2).
"""
from __future__ import annotations

import argparse
import sys

from ..core.blocks import GRANULARITY_HELP
from ..core.quant import BITS
from ..planner import DATASET_SHAPES, plan_for_model

HELP = "memory per worker and traffic per step of sharded TWA, before launching anything"
DESCRIPTION = ("Memory per worker and traffic per step of sharded TWA, from the model's real parameter "
               "shapes and the shard plan the runtime uses; twa.sharding blocks and fsdp side by side.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="a twa_ray.models name (e.g. resnet18), tv:<torchvision name>, or a JSON file "
                             "{parameter name: shape} (python -m twa_ray.planner.llama writes a Llama-like one)")
    parser.add_argument("--candidates", type=int, required=True, help="n, candidates in the subspace (per round)")
    parser.add_argument("--bits", type=int, required=True, choices=BITS, help="bits per projection value")
    parser.add_argument("--workers", type=int, default=1, help="k, TWA workers (default 1)")
    parser.add_argument("--granularity", default="tensor", help=f"blocks: {GRANULARITY_HELP} (default tensor)")
    parser.add_argument("--dataset", default="cifar10", choices=sorted(DATASET_SHAPES),
                        help="input shape and classes of the model (default cifar10)")
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"], help="coefficient optimizer (state size)")
    parser.add_argument("--grad-clip", action="store_true", help="twa.grad_clip is set (one more tiny all-reduce)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")


def command(args: argparse.Namespace) -> int:
    try:
        plan = plan_for_model(
            args.model, args.candidates, args.bits, args.workers, args.granularity, args.dataset,
            grad_clip=args.grad_clip, optimizer=args.optimizer,
        )
    except ValueError as exc:  # unknown model or dataset, bad shapes file, bad granularity, more workers than blocks
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(plan.to_json() if args.json else plan.format())
    return 0
