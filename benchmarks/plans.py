"""The capacity plans the README and RESULTS.md quote, as results lines: the planner
(``twa-ray plan``) is deterministic, so each line is its --json output for one case, with the
command as a user types it and the commit it came from.

    python benchmarks/plans.py [--out benchmarks/results/plans.jsonl]
    python benchmarks/plans.py --table benchmarks/results/plans.jsonl   # RESULTS.md's planner table

Cases: the 7B Llama-like transformer (``python -m twa_ray.planner.llama`` writes its shapes to
a temporary file) with 50 candidates at 2 bits on 64 workers, and the planner-table models at
k = 2 / 4 / 8 (20 candidates, 4 bits): the largest worker against total/k in both sharding modes.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _common import ROOT, emit, machine, utc_date, write_jsonl

from twa_ray.planner.capacity import plan_for_model
from twa_ray.models import MODELS
from twa_ray.planner.llama import llama_shapes
from twa_ray.planner.shapes import write_shapes

LLAMA = "llama7b.json"  # the shapes file's name in the commands, as the README writes it
# (model, dataset): the planner table of tests/planner/test_fsdp_plan.py, every twa_ray.models model
TABLE = tuple((model, "fashion_mnist" if model == "small_cnn" else "cifar10") for model in MODELS)


def case(model: str, candidates: int, bits: int, workers: int, dataset: str | None, shown_model: str) -> dict:
    """One plan as a results line: the plan's JSON and the command that prints it."""
    plan = json.loads(plan_for_model(model, candidates, bits, workers, "tensor", dataset or "cifar10").to_json())
    plan["model"] = shown_model
    command = (f"python -m twa_ray plan --model {shown_model} --candidates {candidates} --bits {bits} "
               f"--workers {workers}" + (f" --dataset {dataset}" if dataset else "") + " --json")
    return {"benchmark": "plans", "command": command, "plan": plan, "date": utc_date(), "machine": machine()}


TABLE_ROWS = (("resnet18", 2), ("resnet18", 4), ("vgg16bn", 2), ("vgg16bn", 4), ("preresnet164", 4), ("wrn28_10", 2),
              ("vit_small", 4))


def markdown_table(lines: list[dict]) -> list[str]:
    """RESULTS.md's planner table (``twa.sharding: blocks``) from plans.jsonl lines: per model of
    TABLE_ROWS its largest worker's projection, that over total/k, and the step's payload and
    wire bytes over one all-reduce of the D float32 gradients."""
    from twa_ray.planner.capacity import human_bytes

    plans = {(line["plan"]["model"], line["plan"]["workers"]): line["plan"] for line in lines}
    rows = ["| model | D | k | largest worker's projection | largest / (total/k) | payload / 4D | wire / one all-reduce |",
            "|---|---|---|---|---|---|---|"]
    for model, workers in TABLE_ROWS:
        plan = plans[(model, workers)]
        rows.append(f"| {model} | {plan['num_params']:,} | {workers} | {human_bytes(max(plan['projection_bytes']))} "
                    f"| {plan['max_over_even_share']:.3f} | {plan['payload']['ratio_to_all_reduce']:.3f} "
                    f"| {plan['wire']['ratio_to_all_reduce']:.3f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/plans.jsonl")
    parser.add_argument("--table", default=None, help="a plans.jsonl: print RESULTS.md's planner table from it")
    args = parser.parse_args(argv)
    if args.table:
        print("\n".join(markdown_table([json.loads(x) for x in Path(args.table).read_text().splitlines() if x.strip()])))
        return 0
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        shapes = Path(tmp) / LLAMA
        write_shapes(shapes, llama_shapes())
        lines.append(case(str(shapes), 50, 2, 64, None, LLAMA))
    for model, dataset in TABLE:
        for workers in (2, 4, 8):
            lines.append(case(model, 20, 4, workers, dataset, model))
    for line in lines:
        plan, fsdp = line["plan"], line["plan"]["fsdp"] or {}
        emit({"command": line["command"],
              "blocks_projection_over_even_share": plan["max_over_even_share"],  # the largest worker's projection
              "fsdp_sharded_over_even_share": fsdp.get("sharded_imbalance"),  # its model + grads + projection
              "fsdp_largest_over_even_share": fsdp.get("largest_over_even_share")})  # + what every rank holds whole
    write_jsonl(ROOT / args.out, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
