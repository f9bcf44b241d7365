"""Val accuracy of the fitted claim's two TWA-t models per seed: over the weights' candidates
and over the EMA's (train.candidates_from: ema), the val side of that key's default (issue 26).

    python benchmarks/fitted_val.py [--work runs/reproduce/full] [--seeds 3]

Reads the run folders ``benchmarks/reproduce.py --claims fitted`` left in --work (each TWA
model as saved, BatchNorm recalibrated) and scores them on the seed's val split of
configs/fitted_stage.yaml (2000 images, which trained nothing in TWA-t). One JSON line per seed.
"""
from __future__ import annotations

import argparse

import torch

from _common import ROOT, emit, machine, utc_date


def val_accuracy(model: torch.nn.Module, dataset) -> float:
    correct = total = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(dataset, batch_size=500):
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return 100.0 * correct / total


def main(argv=None) -> int:
    from twa_ray.config import load_config
    from twa_ray.data.from_config import splits_from_config
    from twa_ray.output.export import load_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/reproduce/full", help="reproduce.py's --work (relative: to the checkout)")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    work = ROOT / args.work
    torch.set_num_threads(1)
    for seed in range(args.seeds):
        val = splits_from_config(load_config(ROOT / "configs" / "fitted_stage.yaml", [f"seed={seed}"])).val
        acc = {name: val_accuracy(load_model(work / f"seed{seed}" / run), val)
               for name, run in (("twa_t", "fitted_twa"), ("twa_t_ema_candidates", "fitted_twa_t_ema_candidates"))}
        emit({"benchmark": "fitted_val", "seed": seed, "val_images": len(val), "val_acc": acc,
              "command": f"python benchmarks/fitted_val.py --work {args.work} --seeds {args.seeds}",
              "date": utc_date(), "machine": machine()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
