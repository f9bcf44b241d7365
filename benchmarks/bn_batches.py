"""How many shuffled batches BatchNorm recalibration needs: test accuracy and time per K.

    python benchmarks/bn_batches.py [--quick | --smoke] [--config configs/quickstart.yaml] [--epochs E]
                                    [--seeds S] [--ks 1 5 10 20 50 all] [--out PATH] [a.b=value ...]

The measurement behind ``twa.bn_batches``. The model is the config's (the quickstart's small
CNN), trained in this process for ``--epochs`` (default ``train.epochs``: the quickstart's 4)
on the config's training images (``data.limit_train``: the quickstart's first 8192) with its
``train.*`` settings (``pipelines.finetune.train_plain``; the schedule laid over those
epochs). Its BatchNorm statistics are then recalibrated the way every evaluation of the main
job does it, ``data.calibration_loader(train_eval, data.eval_batch_size, K, seed)`` ->
``core.baselines.recalibrate_bn``, for K in 1, 5, 10, 20, 50 and all batches and for each
of ``--seeds`` (10) calibration seeds (all batches: at most 3, since the cumulative average
over every batch depends on their order only through the last, partial batch), and the
model is evaluated on the first 2000 test images.

The batches are drawn from the whole training split (Fashion-MNIST: 54,000 images, 106
batches of 512), not from the quickstart's 8192 (16 batches, where K >= 20 would all be
"all"): ``twa.bn_batches`` bounds the cost on full-size data (configs/head_stage.yaml).

Per K one JSON line (stdout, and with a full run benchmarks/results/bn_batches.jsonl; --out
elsewhere): test accuracy over the seeds (mean, sample std, min, max), the mean absolute
difference from the all-batches mean, and the seconds of one recalibration (median over
the seeds; data loading included) and their ratio to all batches. The same as a table on
stderr. ``acc_training_stats`` is the accuracy with the statistics training left behind.

--quick: 1 epoch, 4 seeds. --smoke (tests): 1 epoch on 256 images, calibration from 256
images in batches of 64, K in 1, 2, all, 2 seeds, 128 test images.
"""
from __future__ import annotations

import argparse
import statistics
import time

from _common import ROOT, common_args, emit, machine, note, set_threads, utc_date, write_jsonl

import torch  # noqa: E402
from torch.utils.data import Subset  # noqa: E402

from twa_ray.config import Config, load_config  # noqa: E402
from twa_ray.core.baselines import recalibrate_bn  # noqa: E402
from twa_ray.data import calibration_loader  # noqa: E402
from twa_ray.data.from_config import splits_from_config  # noqa: E402
from twa_ray.models.from_config import model_from_config  # noqa: E402
from twa_ray.tasks import ImageClassification  # noqa: E402
from twa_ray.parallel.evaluate import evaluate  # noqa: E402
from twa_ray.pipelines.finetune import train_plain  # noqa: E402

ALL = "all"
ALL_SEEDS = 3  # seeds at most for all batches (see the module docstring)
MODES = {
    # epochs (None: train.epochs), seeds, Ks, calibration images (None: the whole training split),
    # training images (None: data.limit_train), test images, eval batch size (None: data.eval_batch_size)
    "full": dict(epochs=None, seeds=10, ks=[1, 5, 10, 20, 50, ALL], pool=None, train_images=None, test_images=2000, eval_batch=None),
    "quick": dict(epochs=1, seeds=4, ks=[1, 5, 10, 20, 50, ALL], pool=None, train_images=None, test_images=2000, eval_batch=None),
    "smoke": dict(epochs=1, seeds=2, ks=[1, 2, ALL], pool=256, train_images=256, test_images=128, eval_batch=64),
}


def parse_k(text: str) -> int | str:
    """A K of --ks: a positive number of batches, or "all"."""
    if text == ALL:
        return ALL
    k = int(text)
    if k < 1:
        raise argparse.ArgumentTypeError(f"K must be >= 1 or 'all', got {text}")
    return k


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(parser)
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default train.epochs; --quick, --smoke 1)")
    parser.add_argument("--seeds", type=int, default=None, help="calibration seeds per K (default 10)")
    parser.add_argument("--ks", type=parse_k, nargs="+", default=None, help="batches per recalibration, or all")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None,
                        help="JSON lines file (default: benchmarks/results/bn_batches.jsonl for a full run, none otherwise)")
    parser.add_argument("overrides", nargs="*", help="config overrides a.b=value")
    args = parser.parse_args(argv)
    args.mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    preset = MODES[args.mode]
    args.epochs = args.epochs or preset["epochs"]  # None: the config's train.epochs (load)
    args.seeds = args.seeds or preset["seeds"]
    args.ks = args.ks or preset["ks"]
    if args.out is None and args.mode == "full":
        args.out = str(ROOT / "benchmarks" / "results" / "bn_batches.jsonl")
    return args


def load(args) -> tuple[Config, int]:
    """The config with the calibration pool, test images and eval batch of the mode; and
    the number of training images (the config's ``data.limit_train`` unless the mode sets one)."""
    preset = MODES[args.mode]
    base = load_config(args.config, args.overrides)
    train_images = preset["train_images"] or base.data.limit_train
    pool = preset["pool"]
    overrides = [f"data.limit_train={'null' if pool is None else pool}", f"data.limit_test={preset['test_images']}"]
    if preset["eval_batch"]:
        overrides.append(f"data.eval_batch_size={preset['eval_batch']}")
    cfg = load_config(args.config, [*args.overrides, *overrides])
    args.epochs = args.epochs or cfg.train.epochs
    return cfg, train_images


def summarize(raw: list[dict]) -> list[dict]:
    """Per K (in first-seen order), over the seeds of ``raw`` (one {k, seed, batches,
    images, acc, seconds} per recalibration): accuracy mean, sample std (None for one
    seed), min, max; mean |acc - mean acc of all batches| (when "all" ran); median
    seconds and their ratio to all batches'."""
    by_k: dict = {}
    for r in raw:
        by_k.setdefault(r["k"], []).append(r)
    all_rows = by_k.get(ALL)
    all_acc = statistics.mean(r["acc"] for r in all_rows) if all_rows else None
    all_s = statistics.median(r["seconds"] for r in all_rows) if all_rows else None
    out = []
    for k, rows in by_k.items():
        accs = [r["acc"] for r in rows]
        seconds = statistics.median(r["seconds"] for r in rows)
        out.append({
            "k": k, "batches": rows[0]["batches"], "images": rows[0]["images"], "seeds": len(rows),
            "acc_mean": statistics.mean(accs), "acc_std": statistics.stdev(accs) if len(accs) > 1 else None,
            "acc_min": min(accs), "acc_max": max(accs),
            "mean_abs_diff_to_all": None if all_acc is None else statistics.mean(abs(a - all_acc) for a in accs),
            "recal_s": seconds, "time_ratio_to_all": None if not all_s else seconds / all_s,
        })
    return out


def table(rows: list[dict]) -> str:
    """The summary rows as an aligned text table."""
    def num(x, fmt):
        return "-" if x is None else format(x, fmt)

    lines = [f"{'K':>4} {'batches':>7} {'images':>7} {'test acc %':>17} {'min..max':>13} {'|d to all|':>10} "
             f"{'recal s':>8} {'x all':>6}"]
    for r in rows:
        lines.append(f"{r['k']!s:>4} {r['batches']:>7} {r['images']:>7} "
                     f"{r['acc_mean']:>8.2f} ± {num(r['acc_std'], '.3f'):>6} "
                     f"{r['acc_min']:>6.2f}..{r['acc_max']:<6.2f} {num(r['mean_abs_diff_to_all'], '.3f'):>10} "
                     f"{r['recal_s']:>8.3f} {num(r['time_ratio_to_all'], '.2f'):>6}")
    return "\n".join(lines)


def measure(model, splits, cfg: Config, ks, seeds: int, device) -> list[dict]:
    """One {k, seed, batches, images, acc, seconds} per K and calibration seed (all
    batches: at most ``ALL_SEEDS`` seeds)."""
    batch = cfg.data.eval_batch_size
    raw = []
    for k in ks:
        for seed in range(min(seeds, ALL_SEEDS) if k == ALL else seeds):
            loader = calibration_loader(splits.train_eval, batch, None if k == ALL else k, seed)
            started = time.perf_counter()
            recalibrate_bn(model, loader, device)
            seconds = time.perf_counter() - started
            acc = evaluate(model, splits.test, ImageClassification(), device, batch).accuracy
            raw.append({"k": k, "seed": seed, "batches": len(loader), "images": len(loader.dataset),
                        "acc": acc, "seconds": seconds})
            note(f"K={k} seed={seed}: {acc:.2f} % ({seconds:.2f} s)")
    return raw


def main(argv=None) -> int:
    args = parse_args(argv)
    set_threads(args.threads or 1)  # one thread, as the evaluation tasks run
    cfg, train_images = load(args)
    device = torch.device(args.device)
    splits = splits_from_config(cfg, include_test=True, reason="benchmarks/bn_batches.py")
    train = splits.train if train_images is None else Subset(splits.train, range(min(train_images, len(splits.train))))
    torch.manual_seed(cfg.seed)
    model = model_from_config(cfg, splits)
    started = time.perf_counter()
    history = train_plain(model, train, cfg.train, epochs=args.epochs, batch_size=cfg.data.batch_size, lr=cfg.train.lr,
                          weight_decay=cfg.train.weight_decay, label_smoothing=cfg.train.label_smoothing,
                          seed=cfg.seed, device=device)
    train_s = time.perf_counter() - started
    training_stats = evaluate(model, splits.test, ImageClassification(), device, cfg.data.eval_batch_size).accuracy
    note(f"{cfg.model.name}: {args.epochs} epoch(s) on {len(train)} images in {train_s:.1f} s; "
         f"test {training_stats:.2f} % with training's BatchNorm statistics")
    rows = summarize(measure(model, splits, cfg, args.ks, args.seeds, device))
    common = {
        "benchmark": "bn_batches", "mode": args.mode, "config": cfg.name, "dataset": cfg.data.name,
        "model": cfg.model.name, "train_images": len(train), "epochs": args.epochs, "train_s": train_s,
        "train_acc": history[-1]["train_acc"], "acc_training_stats": training_stats,
        "pool_images": len(splits.train_eval), "eval_batch_size": cfg.data.eval_batch_size,
        "test_images": len(splits.test), "device": str(device), "date": utc_date(), "machine": machine(),
    }
    records = [{**common, **row} for row in rows]
    for r in records:
        emit(r)
    note(table(rows))
    if args.out:
        note(f"JSON lines: {write_jsonl(args.out, records)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
