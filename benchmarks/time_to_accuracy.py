"""Time to accuracy: full-budget SGD against half the epochs of base training + TWA.

    python benchmarks/time_to_accuracy.py [--quick] [--config configs/quickstart.yaml] [a.b=value ...]
    python benchmarks/time_to_accuracy.py --summary runs/quickstart/summary.json   # an existing run

Runs the main job (``jobs/cifar_twa.py --config ... compare_full_budget=true``) in a
subprocess into a temporary run folder (a local Ray on 127.0.0.1, or the cluster in
RAY_ADDRESS) and reads its summary.json: base training runs ``train.epochs`` of a
``train.budget_epochs`` schedule (half, in the quickstart), TWA trains the coefficients
of its candidates, and the full-budget run trains all the epochs. One JSON line: the
wall-time ratio (base training + TWA) / full budget and the test-accuracy difference
TWA - full budget (percentage points), with SWA and the last candidate for reference.
Times are each stage's TorchTrainer.fit wall time, Ray worker start-up included.

--quick: the quickstart on 1024 training images (1000 test images), 1 of 2 epochs, 1 TWA
epoch: mostly Ray start-up, so the time ratio says little; the full run is the measurement.
--smoke: a tiny synthetic config (a minute, most of it Ray start-up).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, common_args, emit, machine, note

QUICK = ["data.limit_train=1024", "data.limit_val=256", "data.limit_test=1000", "train.epochs=1",
         "train.budget_epochs=2", "twa.epochs=1"]
SMOKE_CONFIG = """\
# run: python benchmarks/time_to_accuracy.py --smoke
seed: 1
data: {name: synthetic, val_ratio: 0.2, batch_size: 32,
       synthetic: {num_train: 200, num_test: 100, num_classes: 3, channels: 1, image_size: 8}}
model: {name: small_cnn, kwargs: {widths: [4, 8, 8]}}
train: {epochs: 1, budget_epochs: 2, lr: 0.05, schedule: cosine, use_gpu: false}
twa: {epochs: 1, bits: 4, lr: 0.3, workers: 1, use_gpu: false}
"""


def record(summary: dict, source: str, mode: str, job_wall_s: float | None) -> dict:
    t, acc = summary["time_s"], summary["test_acc"]
    if t.get("full_budget") is None or acc.get("full_budget") is None:
        raise ValueError(f"{source}: no full-budget run in the summary (run with compare_full_budget=true)")
    ours = t["base_train"] + t["twa"]
    return {
        "benchmark": "time_to_accuracy", "mode": mode, "source": source,
        "config": summary.get("config"), "dataset": summary.get("dataset"), "model": summary.get("model"),
        "base_epochs": summary.get("base_epochs"), "budget_epochs": summary.get("budget_epochs"),
        "twa_epochs": summary.get("twa_epochs"), "num_candidates": summary.get("num_candidates"),
        "bits": summary.get("bits"), "workers": summary.get("workers"),
        "base_train_s": t["base_train"], "twa_s": t["twa"], "full_budget_s": t["full_budget"],
        "time_ratio": ours / t["full_budget"],  # (base training + TWA) / full-budget SGD
        "test_acc_twa": acc["twa"], "test_acc_full_budget": acc["full_budget"],
        "test_acc_swa": acc.get("swa"), "test_acc_last": acc.get("last"),
        "acc_diff_twa_minus_full": acc["twa"] - acc["full_budget"],
        "job_wall_s": job_wall_s, "machine": machine(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(parser)
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--summary", default=None, help="read this summary.json instead of running the job")
    parser.add_argument("--output-dir", default=None, help="keep the run folder here (default: a temporary one)")
    parser.add_argument("overrides", nargs="*", help="config overrides a.b=value for the job")
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    if args.summary:
        emit(record(json.loads(Path(args.summary).read_text()), args.summary, mode, None))
        return 0
    with tempfile.TemporaryDirectory(prefix="twa_tta_") as tmp:
        out = Path(args.output_dir or Path(tmp) / "run").resolve()
        config = args.config
        overrides = list(args.overrides)
        if args.smoke:
            config = str(Path(tmp) / "smoke.yaml")
            Path(config).write_text(SMOKE_CONFIG)
        elif args.quick:
            overrides = QUICK + overrides
        cmd = [sys.executable, str(ROOT / "jobs" / "cifar_twa.py"), "--config", config, "--force",
               "compare_full_budget=true", f"output_dir={out}", *overrides]
        env = dict(os.environ)
        for key, value in (("RAY_USAGE_STATS_ENABLED", "0"), ("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")):
            env.setdefault(key, value)
        note("running: " + " ".join(cmd))
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            note(proc.stdout[-4000:])
            note(proc.stderr[-4000:])
            raise SystemExit(f"the job failed with exit code {proc.returncode}")
        emit(record(json.loads((out / "summary.json").read_text()), str(out / "summary.json"), mode, wall))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
