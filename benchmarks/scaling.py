"""Per-worker projection bytes and step time of sharded TWA for k = 1 and k = 2 workers.

    python benchmarks/scaling.py [--quick | --smoke] [--model NAME ...] [--threads T]

Workers are local gloo processes (torch.multiprocessing, the library's exchanges;
no Ray start-up in the timings), each with T torch threads (default 1, so k = 2 uses
both cores of this machine), a fixed global batch split across them, and its column
shard of the projection built the way the runtime builds it. One JSON line per (model,
k): the projection bytes of every worker, their largest against total/k (target <=
1.05), the median step time (forward + backward + ``twa.step()``, slowest worker) and the
speed-up over k = 1.

Default: CIFAR ResNet-18 and VGG16-BN, n = 20, 4 bits, one block per tensor, global
batch 64, 3 timed steps. --quick: ResNet-18 only, 2 steps. --smoke: small CNN, 8x8.
"""
from __future__ import annotations

import argparse

from _common import common_args, emit, machine, note
from _dist import Setting, run_workers, setting_dict

TARGET_RATIO = 1.05


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(parser)
    parser.add_argument("--model", nargs="*", default=None)
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--candidates", type=int, default=None)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--granularity", default="tensor")
    parser.add_argument("--batch", type=int, default=None, help="global batch (default 64; 8 with --smoke)")
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    models = args.model or {"smoke": ["small_cnn"], "quick": ["resnet18"], "full": ["resnet18", "vgg16bn"]}[mode]
    for model in models:
        single = None
        for k in args.workers:
            setting = Setting(
                model=model, image_size=8 if args.smoke else 32, candidates=args.candidates or (4 if args.smoke else 20),
                bits=args.bits, granularity=args.granularity, global_batch=args.batch or (8 if args.smoke else 64),
                steps={"smoke": 1, "quick": 2, "full": 3}[mode], threads=args.threads or 1,
            )
            note(f"scaling: {model}, k={k} ...")
            res = run_workers(setting, k)
            per_worker = [r["projection_bytes"] for r in res]
            total = sum(per_worker)
            step = max(r["step_s"] for r in res)
            if k == 1:
                single = {"step_s": step, "projection_bytes": total}
            ratio = max(per_worker) / (total / k)
            emit({
                "benchmark": "scaling", "mode": mode, "model": model, "workers": k, "setting": setting_dict(setting),
                "num_params": res[0]["num_params"], "num_blocks": res[0]["num_blocks"],
                "coords_per_worker": [r["coords"] for r in res],
                "projection_bytes_per_worker": per_worker,
                "planned_projection_bytes_per_worker": [r["planned_projection_bytes"] for r in res],
                "projection_bytes_total": total,
                "max_over_even_share": ratio, "target_ratio": TARGET_RATIO, "meets_target": ratio <= TARGET_RATIO,
                "step_s": step, "step_s_per_worker": [r["step_s"] for r in res],
                "twa_update_s_per_worker": [r["twa_update_s"] for r in res],
                "speedup_over_1_worker": (single["step_s"] / step) if single else None,
                "build_s_per_worker": [r["build_s"] for r in res],
                "machine": machine(),
            })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
