"""A whole TWA step in the fsdp mode against the blocks mode (``twa.sharding``), k = 2 workers.

    python benchmarks/sharding_speed.py [--quick | --smoke] [--model head_stage resnet18] [--rounds R]
                                        [--workers K] [--threads T] [--out FILE]

Two gloo processes on 127.0.0.1 (torch.multiprocessing; no Ray start-up in the timings), each
with T torch threads (default 1: k = 2 uses both cores of a 2-core machine). Each builds TWA
in both modes on the same candidates (one candidate store), with the runtime's builders (the
mode objects of ``twa_ray.parallel.sharding``: ``wrap``, then ``build_twa``): a full model
replica (blocks) and the model wrapped by FSDP2 (fsdp). A step is forward + backward + ``twa.step()``, with every
collective of the mode (blocks: TWA's gradient and weight exchange as ``twa.exchange: auto``
picks it for the backend, and the n x L all-reduce; fsdp: FSDP2's per-unit all-gathers and
reduce-scatters and the n x L all-reduce), on a fixed global
batch split across the workers. The two modes' steps alternate round by round (which one goes
first alternates too), after one warm-up round; a step's time is its slowest worker's. Per model
and mode one JSON line: ``step_s`` (median over rounds), ``ratio_fsdp_to_blocks`` (median of
the per-round ratios), ``twa_update_s`` (``twa.step()`` alone), and ``first_step_weight_diff``:
after the warm-up step both modes hold the same weights to float rounding.

Models: ``head_stage``, configs/head_stage.yaml's small CNN (390,890 parameters; its batch of
100 one-channel 28x28 images, its 30 candidates, 8 bits, one block per tensor), and
``resnet18``, CIFAR ResNet-18 (batch 64, n = 20, 4 bits). Rounds: 10 (--quick: the head stage
only, 3; --smoke: a small CNN on 8x8 inputs, n = 4, 2). A full run writes the JSON lines to
benchmarks/results/sharding_speed.jsonl (``--out``); --quick and --smoke only print them.
"""
from __future__ import annotations

import argparse

from _common import ROOT, common_args, emit, machine, median, note, paired_ratio, utc_date, write_jsonl
from _dist import SHARDINGS, Setting, setting_dict, time_sharding_steps

MODELS = ("head_stage", "resnet18")


def model_setting(name: str, mode: str, rounds: int, threads: int) -> Setting:
    """The benchmark setting of model ``name`` (``MODELS``, or small_cnn: --smoke's)."""
    common = {"steps": rounds, "warmup_steps": 1, "threads": threads, "lr": 0.05}
    if name == "small_cnn":  # --smoke
        return Setting(model="small_cnn", image_size=8, candidates=4, bits=4, global_batch=8, **common)
    if name == "resnet18":
        return Setting(model="resnet18", image_size=32, candidates=20, bits=4, global_batch=64, **common)
    from step_overhead import setting as step_setting  # the head stage as the step benchmark reads it

    head = step_setting("head_stage")
    return Setting(model=head.model, model_kwargs=head.model_kwargs, in_channels=head.in_channels,
                   image_size=head.image, candidates=head.candidates, bits=head.bits, granularity=head.granularity,
                   global_batch=head.batch, **common)


def slowest(results: list[dict], key: str, sharding: str) -> list[float]:
    """Per round, the slowest worker's seconds of ``results[r][key][sharding]``."""
    return [max(r[key][sharding][i] for r in results) for i in range(len(results[0][key][sharding]))]


def speed_records(name: str, setting: Setting, results: list[dict], mode: str) -> list[dict]:
    """One record per mode from the workers' results (``_dist.time_sharding_steps``)."""
    steps = {s: slowest(results, "step_s", s) for s in SHARDINGS}
    ratio = paired_ratio(steps["fsdp"], steps["blocks"])
    info, date = machine(), utc_date()
    out = []
    for sharding in SHARDINGS:
        out.append({
            "benchmark": "sharding_speed", "mode": mode, "model": name, "sharding": sharding,
            "workers": len(results), "setting": setting_dict(setting), "num_params": results[0]["num_params"],
            "step_s": median(steps[sharding]), "min_step_s": min(steps[sharding]), "rounds": len(steps[sharding]),
            "twa_update_s": median(slowest(results, "twa_update_s", sharding)),
            "ratio_fsdp_to_blocks": ratio,
            # how the blocks mode exchanged gradient and weights (twa.exchange: auto on this backend)
            "exchange": results[0]["exchange"] if sharding == "blocks" else None,
            "build_s_per_worker": [r["build_s"][sharding] for r in results],
            "param_bytes_per_worker": [r["param_bytes"][sharding] for r in results],
            "projection_bytes_per_worker": [r["projection_bytes"][sharding] for r in results],
            "first_step_weight_diff": max(r["first_step_weight_diff"] for r in results),
            "first_step_weight_change": results[0]["first_step_weight_change"],
            "date": date, "machine": info,
        })
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(parser)
    parser.add_argument("--model", nargs="*", choices=MODELS, default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", default=None,
                        help="JSON lines file (default: benchmarks/results/sharding_speed.jsonl for a full run, "
                             "none otherwise)")
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    names = ["small_cnn"] if args.smoke else args.model or (["head_stage"] if args.quick else list(MODELS))
    rounds = args.rounds or {"smoke": 2, "quick": 3, "full": 10}[mode]
    out = args.out or (str(ROOT / "benchmarks" / "results" / "sharding_speed.jsonl") if mode == "full" else None)
    records = []
    for name in names:
        setting = model_setting(name, mode, rounds, args.threads or 1)
        note(f"sharding_speed: {name} ({setting.model}), k={args.workers}, {rounds} rounds ...")
        for record in speed_records(name, setting, time_sharding_steps(setting, args.workers), mode):
            emit(record)
            records.append(record)
        blocks, fsdp = records[-2], records[-1]
        note(f"  blocks {blocks['step_s']:.3f} s, fsdp {fsdp['step_s']:.3f} s per step: "
             f"fsdp / blocks = {fsdp['ratio_fsdp_to_blocks']:.3f}")
    if out:
        note(f"JSON lines: {write_jsonl(out, records)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
