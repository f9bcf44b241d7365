"""The paper's claims on real data, each over several seeds: mean ± std, and each target met or not.

    python benchmarks/reproduce.py [--claims head,fitted,tail,bits,probe,soups] [--seeds 3 | --seed-list 0,2] [--runs NAMES] [--out DIR] [--work DIR]
    python benchmarks/reproduce.py --quick       # a small version: minutes, 1 seed
    python benchmarks/reproduce.py --results benchmarks/results/reproduce.jsonl   # tables, plot, targets again
    python benchmarks/reproduce.py --results benchmarks/results/reproduce.jsonl --readme README.md
    python benchmarks/reproduce.py --results A.jsonl B.jsonl --merged all.jsonl   # several invocations' lines as one

Each run is the real job in a subprocess (a local Ray per job, or the cluster in RAY_ADDRESS),
seeds 0 .. N-1 (``seed=`` override):

1. head (configs/head_stage.yaml, ``twa-ray run``): candidates from the first half of the
   schedule. One run trains them, TWA-t, the full budget and SGD at equal compute
   (compare_full_budget=true); a second trains TWA-v on the same candidate store. Methods: last,
   swa, ema, best_k, twa_t, twa_v, full_budget, sgd_same_compute; ratios: cost_ratio and
   wall_ratio of each TWA against the full budget. The line of the run with the full budget also
   keeps its per-epoch history (``history``: train loss, val accuracy of each epoch after base
   training's end, of the full budget and of SGD at equal compute).
1b. fitted (configs/fitted_stage.yaml): the head stage where the base network fits its training
   data after the lr decay (4000 images without augmentation, a 40-epoch step schedule), with the ICLR'23
   recipe (basis checkpoints, granularity model, a candidate per epoch, TWA for ~10% of the base
   epochs on a step schedule, lr and epochs chosen on val by configs/tune_fitted_stage.yaml).
   One run per seed: last, swa, ema, best_k, twa_t, full_budget, sgd_same_compute.
   head and fitted: with a claim in EMA_CANDIDATES_LR, also TWA-t over the EMA's candidates
   (train.candidates_from=ema, its own base training and store): ``twa_t_ema_candidates``.
2. tail (configs/tail_stage.yaml): TWA against SWA and EMA of the constant-lr tail's candidates.
3. bits: the head stage's TWA-t with twa.bits 1/2/4/8/32, and twa.basis normalized /
   orthonormal / checkpoints, each at its lr chosen on val (BITS_LR, BASIS_LR), on each seed's
   head-stage candidate store: base training runs once per seed, only TWA and evaluation run again.
4. probe: why the head stage's TWA stays below the full budget, on each seed: TWA-t trained for
   6 epochs over the head-stage store (``twa_t_6_epochs``: the best the candidates' span gives,
   at a cost no longer below 0.6), and the head stage with a cosine budget instead of the step
   schedule (its own store: candidates from a decaying lr; ``cosine_*`` and ``cost_ratio_cosine_twa_t``).
5. soups (configs/soup_quickstart.yaml, ``twa-ray soup``): TWA-v against the greedy soup, the
   uniform soup and the best single fine-tuned model.

Writes to --out (default benchmarks/results; with --quick or --smoke, the --work folder):
reproduce.jsonl (one JSON line per run, also printed on stdout, with the git commit and the
highest load average seen), reproduce.md (mean ± std per claim and method, with the command,
date and machine; then per claim the methods paired by seed: TWA - method, mean ± std over the
seeds, and each method's compute as a fraction of the full budget's; then the targets) and
reproduce.png.
Accuracies are test accuracies in percent; std is the sample standard deviation over the
seeds (none for one seed). The targets compare means over the seeds; each is printed on
stderr beside its measurement, met or not met.

Run folders go to --work (default runs/reproduce/<mode>). A run already complete there for the
same config is not run again (the job's own check), so an interrupted reproduction resumes;
--fresh empties --work first. --quick: at most 4000 training images, a few epochs.
--smoke: tiny synthetic data and models (the test): mostly Ray start-up.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from _common import ROOT, common_args, emit, machine, note, replace_block, write_jsonl

# the order they run in: bits and probe reuse head's candidates
CLAIMS = ("head", "fitted", "tail", "bits", "probe", "soups")
CONFIGS = {"head": "configs/head_stage.yaml", "fitted": "configs/fitted_stage.yaml", "tail": "configs/tail_stage.yaml",
           "bits": "configs/head_stage.yaml", "probe": "configs/head_stage.yaml",
           "soups": "configs/soup_quickstart.yaml"}
COMMANDS = {"head": "run", "fitted": "run", "tail": "run", "bits": "run", "probe": "run", "soups": "soup"}  # python -m twa_ray COMMAND
SEEDS = {"full": 3, "quick": 1, "smoke": 1}
BITS = (1, 2, 4, 8, 32)
BASES = ("normalized", "orthonormal", "checkpoints")
# The coefficient lr of each bits run, chosen on val (select_acc) by configs/tune_head_bits.yaml
# over lr 0.1 / 0.3 / 1.0 on seed 0's head-stage candidates (benchmarks/results/tune_head_bits.jsonl;
# from 2 bits up every lr was within 0.3 points). 1 bit: no lr trains (43 % at best).
BITS_LR = {1: 0.1, 2: 0.3, 4: 0.1, 8: 0.3, 32: 0.1}
# ... and of each other basis (8 bits), by configs/tune_head_bases.yaml (tune_head_bases.jsonl)
BASIS_LR = {"orthonormal": 1.0, "checkpoints": 1.0}
# TWA-v trains on the 6k val images: 9 epochs of them are as many examples as TWA-t's one
# epoch over the 54k training images, so the two cost alike
TWA_V = ("twa.data=val", "twa.epochs=9")
# Copied from each summary.json into its run's line when present: how the numbers came about
CONTEXT = ("num_candidates", "num_models", "bits", "basis", "granularity", "twa_data", "trained_on", "epochs",
           "swa_candidates", "best_k_candidates", "twa_includes_initial", "ema_decay", "full_budget_continued",
           "best_individual", "greedy_soup_members", "time_s", "base_epochs", "budget_epochs", "twa_epochs")
# train.candidates_from=ema (issue 26, item 7): TWA over the EMA's candidates, a run of its own per
# seed (its own base training and store), at the coefficient lr chosen on val over seed 0's EMA
# candidates by the claim's sweep with train.candidates_from=ema. A claim not listed has no such run.
# fitted: lr 0.1 at the claim's 2 TWA epochs, the best select_acc (87.75 %) of those epochs in
# configs/tune_fitted_stage.yaml's sweep with train.candidates_from=ema (tune_fitted_stage_ema.jsonl).
# head: lr 0.25 at the claim's one TWA epoch, the best select_acc (91.75 %; lr 1.0 91.73 %, lr 4.0
# diverged) of configs/tune_head_stage.yaml's sweep over lr 0.25 / 1 / 4 with all 30 candidates and
# train.candidates_from=ema (tune_head_stage_ema.jsonl).
EMA_CANDIDATES_LR: dict[str, float] = {"fitted": 0.1, "head": 0.25}
WORK_MARK = ".reproduce-work"  # --fresh only empties a folder this script made

QUICK_DATA = ["data.limit_train=4000", "data.limit_val=1000", "data.limit_test=2000"]
SMOKE_DATA = [
    "data.name=synthetic", "data.batch_size=32", "data.augment=false",
    "data.synthetic={num_train: 320, num_test: 128, num_classes: 3, channels: 1, image_size: 8}",
    "data.limit_train=null", "data.limit_val=null", "data.limit_test=null",
    "model.kwargs={widths: [4, 8, 8]}", "twa.bn_batches=2",
]
# Per mode and claim, overrides of the claim's config (bits: the head stage's, for the same
# candidates). Quick: 40 steps per epoch (4000 images, batch 100), smoke: 9 (288 synthetic
# training images, batch 32); candidates every quarter / third of an epoch.
QUICK_HEAD = QUICK_DATA + ["train.epochs=2", "train.budget_epochs=4", "train.save_every_steps=10"]
SMOKE_HEAD = SMOKE_DATA + ["train.epochs=2", "train.budget_epochs=4", "train.save_every_steps=3"]
# fitted: one candidate per epoch, so a few more (short) epochs; 6 steps per epoch quick
QUICK_FITTED = ["data.limit_train=600", "data.limit_val=300", "data.limit_test=500", "train.epochs=3",
                "train.budget_epochs=6", "twa.epochs=1"]
SMOKE_FITTED = SMOKE_DATA + ["train.epochs=3", "train.budget_epochs=6", "twa.epochs=1"]
MODE_OVERRIDES = {
    "full": {claim: [] for claim in CLAIMS},
    "quick": {
        "head": QUICK_HEAD, "bits": QUICK_HEAD, "probe": QUICK_HEAD, "fitted": QUICK_FITTED,
        "tail": QUICK_DATA + ["train.epochs=4", "train.budget_epochs=4", "train.save_from_epoch=3",
                              "train.save_every_steps=10", "twa.epochs=1"],
        "soups": QUICK_DATA + ["finetune.pretrain_epochs=2", "finetune.num_models=4", "finetune.epochs=1",
                               "twa.epochs=2"],
    },
    "smoke": {
        "head": SMOKE_HEAD, "bits": SMOKE_HEAD, "probe": SMOKE_HEAD, "fitted": SMOKE_FITTED,
        "tail": SMOKE_DATA + ["train.epochs=4", "train.budget_epochs=4", "train.save_from_epoch=3",
                              "train.save_every_steps=3", "twa.epochs=1"],
        "soups": SMOKE_DATA + ["finetune.pretrain_epochs=1", "finetune.pretrain_classes=[0, 1]",
                               "finetune.num_models=3", "finetune.epochs=1", "twa.epochs=1"],
    },
}


# ---------------------------------------------------------------- summaries


class SummaryError(ValueError):
    """A job's summary.json lacks a key (or value) this benchmark reads."""


def need(summary: dict, key: str, source: str):
    """``summary``'s value at the dotted ``key``; SummaryError naming the key and file when it is
    missing or null (null: the method did not run)."""
    node = summary
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise SummaryError(f"{source}: summary.json has no {key}, which benchmarks/reproduce.py reads "
                               "(the job's summary does not have the keys this benchmark expects)")
        node = node[part]
    if node is None:
        raise SummaryError(f"{source}: {key} is null in summary.json (that method did not run)")
    return node


def pick(summary: dict, keys: dict[str, str], source: str) -> dict[str, float]:
    """{name: float(summary[dotted key])} for each entry of ``keys``."""
    return {name: float(need(summary, key, source)) for name, key in keys.items()}


def check_twa_data(summary: dict, expected: str, source: str) -> None:
    """TWA trained its coefficients on ``expected`` ("train": TWA-t, "val": TWA-v)."""
    got = need(summary, "twa_data", source)
    if got != expected:
        raise SummaryError(f"{source}: twa_data is {got!r}, expected {expected!r}")


def stage_seconds(summary: dict, stage: str, source: str, wall: bool) -> float:
    """A stage's compute seconds, or with ``wall`` its start-up + compute."""
    compute = float(need(summary, f"time_s.{stage}.compute", source))
    return compute + (float(need(summary, f"time_s.{stage}.startup", source)) if wall else 0.0)


def swap_twa_stage(ratio: float, base_s: float, twa_s: float, other_twa_s: float) -> float:
    """(base + TWA) / full  ->  (base + other TWA) / full: the same base training and full budget,
    another TWA run on the same candidates."""
    return ratio * (base_s + other_twa_s) / (base_s + twa_s)


HEAD_ACC = {"last": "test_acc.last", "swa": "test_acc.swa", "ema": "test_acc.ema", "best_k": "test_acc.best_k",
            "full_budget": "test_acc.full_budget", "sgd_same_compute": "test_acc.sgd_same_compute",
            "twa_t": "test_acc.twa"}
HEAD_RATIOS = {"cost_ratio_twa_t": "cost_ratio", "wall_ratio_twa_t": "wall_ratio",
               "twa_epoch_vs_sgd_epoch": "twa_epoch_vs_sgd_epoch"}
TAIL_ACC = {"last": "test_acc.last", "swa": "test_acc.swa", "ema": "test_acc.ema", "twa": "test_acc.twa"}
SOUP_ACC = {"best_individual": "test_acc.best_individual", "uniform_soup": "test_acc.uniform_soup",
            "greedy_soup": "test_acc.greedy_soup", "twa_v": "test_acc.twa"}


def head_twa_t(summary: dict, source: str) -> tuple[dict, dict]:
    """(accuracies, ratios) of the head stage's TWA-t run (which also ran the full budget)."""
    check_twa_data(summary, "train", source)
    if stage_seconds(summary, "base_train", source, wall=False) <= 0:
        raise SummaryError(f"{source}: time_s.base_train.compute is 0: no base-training compute to put in the "
                           "cost ratios (run again with --fresh)")
    return pick(summary, HEAD_ACC, source), pick(summary, HEAD_RATIOS, source)


def head_twa_v(summary: dict, twa_t_summary: dict, source: str, twa_t_source: str) -> tuple[dict, dict]:
    """(accuracies, ratios) of the head stage's TWA-v run: its cost replaces TWA-t's TWA stage
    in the TWA-t run's ratios (the same base training and full budget)."""
    check_twa_data(summary, "val", source)
    ratios = {}
    for name, wall in (("cost_ratio", False), ("wall_ratio", True)):
        ratios[f"{name}_twa_v"] = swap_twa_stage(
            float(need(twa_t_summary, name, twa_t_source)),
            stage_seconds(twa_t_summary, "base_train", twa_t_source, wall),
            stage_seconds(twa_t_summary, "twa", twa_t_source, wall),
            stage_seconds(summary, "twa", source, wall))
    return {"twa_v": float(need(summary, "test_acc.twa", source))}, ratios


EMA_CANDIDATES = "twa_t_ema_candidates"  # TWA-t over train.candidates_from=ema's candidates


def ema_candidates_run(summary: dict, source: str) -> tuple[dict, dict]:
    """TWA-t's accuracy over the EMA's candidates (a run without the full budget)."""
    check_twa_data(summary, "train", source)
    return {EMA_CANDIDATES: float(need(summary, "test_acc.twa", source))}, {}


def budget_fractions(summary: dict, source: str) -> dict[str, float]:
    """Each method's compute (seconds inside the stages' loops) as a fraction of the full
    budget's, from a run with the full budget: the fixed averages cost base training, TWA-t base
    training + TWA, SGD at equal compute base training + its continuation."""
    base, twa = (stage_seconds(summary, stage, source, wall=False) for stage in ("base_train", "twa"))
    full = stage_seconds(summary, "full_budget", source, wall=False)
    full += base if summary.get("full_budget_continued") else 0.0
    same = stage_seconds(summary, "sgd_same_compute", source, wall=False)
    fractions = {name: base / full for name in ("last", "swa", "ema", "best_k")}
    fractions.update(full_budget=1.0, sgd_same_compute=(base + same) / full, twa_t=(base + twa) / full)
    return fractions


def compute_fractions(run: "Run", summary: dict, source: str, acc: dict, ratios: dict,
                      reference: tuple[dict, str] | None) -> dict[str, float]:
    """{method: compute / the full budget's} of a finished run's methods; ``reference``: the
    seed's run with the full budget (summary, path), whose base training and full budget a TWA
    run on other or the same candidates shares. {} where no full budget ran."""
    if "full_budget" in acc:
        return {name: value for name, value in budget_fractions(summary, source).items() if name in acc}
    if "twa_v" in acc:
        return {"twa_v": ratios["cost_ratio_twa_v"]}
    if EMA_CANDIDATES in acc and reference is not None:
        ref, ref_source = reference
        return {EMA_CANDIDATES: swap_twa_stage(
            float(need(ref, "cost_ratio", ref_source)), stage_seconds(ref, "base_train", ref_source, False),
            stage_seconds(ref, "twa", ref_source, False), stage_seconds(summary, "twa", source, False))}
    return {}


def epoch_fractions(run: "Run", summary: dict, acc: dict) -> dict[str, float]:
    """{method: its epochs / the full budget's} (a TWA epoch counted as one SGD epoch over the same
    data): the nominal compute, which a machine shared with other work does not blur as it does
    the measured seconds. TWA-t's and SGD at equal compute's are the same by construction."""
    epochs, budget = summary.get("epochs") or {}, summary.get("budget_epochs")
    base = epochs.get("base")
    if not (budget and base is not None) or "twa_v" in acc:
        return {}  # TWA-v's epochs are over the val split: no SGD epochs to count them in
    twa = epochs.get("twa") or 0
    out = {name: base / budget for name in ("last", "swa", "ema", "best_k") if name in acc}
    out.update({name: (base + twa) / budget for name in ("twa_t", EMA_CANDIDATES) if name in acc})
    if "full_budget" in acc:
        out["full_budget"] = 1.0
    if "sgd_same_compute" in acc and epochs.get("sgd_same_compute"):
        out["sgd_same_compute"] = epochs["sgd_same_compute"] / budget
    return out


HISTORY_STAGES = ("full_budget", "sgd_same_compute")
HISTORY_KEYS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "time")


def stage_history(run_dir: Path) -> dict[str, list[dict]]:
    """The per-epoch metrics (metrics.parquet) of the full budget's and SGD at equal compute's
    epochs: where the full budget's gain over the head stage's methods comes from (val accuracy,
    train loss of each epoch after the lr decay). {} without the file or those stages."""
    path = run_dir / "metrics.parquet"
    if not path.exists():
        return {}
    import pyarrow.parquet as pq

    out: dict[str, list[dict]] = {}
    for row in pq.read_table(path).to_pylist():
        if row.get("stage") in HISTORY_STAGES:
            out.setdefault(row["stage"], []).append(
                {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()
                 if k in HISTORY_KEYS and v is not None})
    return out


PROBE_EPOCHS = 6  # TWA epochs of the probe's run to convergence in the span


def probe_epochs_run(summary: dict, source: str) -> tuple[dict, dict]:
    """TWA-t's accuracy after PROBE_EPOCHS epochs over the head stage's candidates."""
    check_twa_data(summary, "train", source)
    if need(summary, "twa_epochs", source) != PROBE_EPOCHS:
        raise SummaryError(f"{source}: twa_epochs is {summary['twa_epochs']}, expected {PROBE_EPOCHS}")
    return {f"twa_t_{PROBE_EPOCHS}_epochs": float(need(summary, "test_acc.twa", source))}, {}


def probe_cosine_run(summary: dict, source: str) -> tuple[dict, dict]:
    """The head stage's methods and TWA-t's cost ratio under a cosine budget, each prefixed ``cosine_``."""
    acc, ratios = head_twa_t(summary, source)
    return ({f"cosine_{k}": v for k, v in acc.items()},
            {"cost_ratio_cosine_twa_t": ratios["cost_ratio_twa_t"]})


def tail_run(summary: dict, source: str) -> tuple[dict, dict]:
    return pick(summary, TAIL_ACC, source), {}


def soups_run(summary: dict, source: str) -> tuple[dict, dict]:
    check_twa_data(summary, "val", source)
    return pick(summary, SOUP_ACC, source), {}


def bits_run(summary: dict, source: str, labels: tuple[str, ...]) -> tuple[dict, dict]:
    """TWA's accuracy, under each label the run stands for (e.g. bits=8 and basis=normalized)."""
    acc = float(need(summary, "test_acc.twa", source))
    return {label: acc for label in labels}, {}


# ---------------------------------------------------------------- the runs


@dataclass(frozen=True)
class Run:
    """One job run of a claim for one seed; its folder is <work>/seed<seed>/<name>."""

    claim: str
    name: str
    overrides: tuple[str, ...]
    shared_store: bool  # the seed's candidate store <store>_candidates (head and bits: the head stage's)
    labels: tuple[str, ...] = ()  # bits: the metrics its TWA accuracy stands for (bits=8, basis=normalized)
    store: str = "head"  # with shared_store: whose store, <work>/seed<seed>/<store>_candidates


def plan(claim: str, mode: str) -> list[Run]:
    """The runs of ``claim`` for one seed, in order."""
    base = tuple(MODE_OVERRIDES[mode][claim])
    ema = [Run(claim, f"{claim}_{EMA_CANDIDATES}", base + (
        "compare_full_budget=false", "train.candidates_from=ema", f"twa.lr={EMA_CANDIDATES_LR[claim]}"), True,
        store=f"{claim}_ema")] if claim in EMA_CANDIDATES_LR else []
    if claim == "head":
        return [Run("head", "head_twa_t", base + ("compare_full_budget=true",), True),
                Run("head", "head_twa_v", base + ("compare_full_budget=false",) + TWA_V, True)] + ema
    if claim == "fitted":  # one run: base training, TWA-t, the full budget and SGD at equal compute
        return [Run("fitted", "fitted_twa", base + ("compare_full_budget=true",), True, store="fitted")] + ema
    if claim == "bits":
        from twa_ray.config import load_config

        default = load_config(ROOT / CONFIGS["bits"], list(base)).twa
        fixed = base + ("compare_full_budget=false",)
        runs = [Run("bits", f"bits_{bits}", fixed + (f"twa.bits={bits}", f"twa.lr={BITS_LR[bits]}"), True,
                    (f"bits={bits}",) + ((f"basis={default.basis}",) if bits == default.bits else ()))
                for bits in BITS]
        runs += [Run("bits", f"bits_basis_{b}", fixed + (f"twa.basis={b}", f"twa.lr={BASIS_LR[b]}"), True,
                     (f"basis={b}",))
                 for b in BASES if b != default.basis]
        return runs
    if claim == "probe":
        return [Run("probe", f"probe_twa_{PROBE_EPOCHS}_epochs",
                    base + ("compare_full_budget=false", f"twa.epochs={PROBE_EPOCHS}"), True),
                Run("probe", "probe_cosine", base + ("compare_full_budget=true", "train.schedule=cosine"), False)]
    return [Run(claim, claim, base, False)]


def job_command(run: Run, seed: int, work: Path) -> tuple[list[str], Path]:
    seed_dir = work / f"seed{seed}"
    run_dir = seed_dir / run.name
    cmd = [sys.executable, "-m", "twa_ray", COMMANDS[run.claim], "--config", CONFIGS[run.claim],  # run in ROOT
           f"seed={seed}", f"output_dir={run_dir}"]
    if run.shared_store:
        cmd.append(f"store={seed_dir / f'{run.store}_candidates'}")
    return cmd + list(run.overrides), run_dir


def typed_arg(arg: str, root: Path = ROOT) -> str:
    """``arg`` (a path, or ``key=path``) with an absolute path inside the repository made
    relative to it; anything else as it is."""
    key, sep, value = arg.rpartition("=") if "=" in arg and not arg.startswith("/") else ("", "", arg)
    path = Path(value)
    if path.is_absolute():
        try:
            value = str(path.resolve().relative_to(root.resolve()))
        except ValueError:
            pass
    return f"{key}{sep}{value}"


def as_typed(args: list[str], root: Path = ROOT) -> str:
    """``args`` as a user types them in the repository: ``python`` for the interpreter, and
    paths inside the repository relative to it (``typed_arg``), so a recorded command shows no
    machine's folders."""
    return shlex.join(["python" if args[0] == sys.executable else args[0], *(typed_arg(a, root) for a in args[1:])])


def execute(cmd: list[str], threads: int | None) -> tuple[float, bool]:
    """Run a job (its stderr shows as it goes); (wall seconds, whether it found its run complete)."""
    env = dict(os.environ)
    for key, value in (("RAY_USAGE_STATS_ENABLED", "0"), ("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")):
        env.setdefault(key, value)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    note("running: " + shlex.join(cmd))
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    note(proc.stdout.rstrip())
    if proc.returncode != 0:
        raise SystemExit(f"the job failed with exit code {proc.returncode}: {shlex.join(cmd)}")
    return wall, "already complete for this config" in proc.stdout


def record(run: Run, seed: int, mode: str, summary: dict, summary_path: Path, acc: dict, ratios: dict,
           cmd: list[str], wall: float, reused: bool, invocation: str, compute: dict | None = None,
           history: dict | None = None, epochs: dict | None = None) -> dict:
    """One run's JSON line: test accuracies (``acc``), ratios, each method's compute as a fraction
    of the full budget's (``compute``), and the full budget's per-epoch ``history`` where it ran."""
    finished = datetime.fromtimestamp(summary_path.stat().st_mtime, timezone.utc)
    return {
        "benchmark": "reproduce", "mode": mode, "claim": run.claim, "seed": seed, "run": run.name,
        "acc": acc, "ratios": ratios, "compute": compute or {}, "epochs_fraction": epochs or {},
        **({"history": history} if history else {}),
        "context": {key: summary[key] for key in CONTEXT if key in summary},
        "summary": typed_arg(str(summary_path)), "command": as_typed(cmd),
        "invocation": invocation,
        "job_wall_s": round(wall, 2), "reused": reused,  # reused: an earlier invocation ran it
        "date": finished.strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
    }


FULL_BUDGET_RUNS = ("head_twa_t", "fitted_twa")  # a claim's run with the full budget: the others' reference


def measure(run: Run, summary: dict, source: str, head_t: tuple[dict, str] | None) -> tuple[dict, dict]:
    """(accuracies, ratios) of a finished run; ``head_t``: the seed's head TWA-t (summary, path)."""
    if run.name in FULL_BUDGET_RUNS:
        return head_twa_t(summary, source)
    if run.name.endswith(EMA_CANDIDATES):
        return ema_candidates_run(summary, source)
    if run.name == "head_twa_v":
        return head_twa_v(summary, *head_t, source)
    if run.claim == "bits":
        return bits_run(summary, source, run.labels)
    if run.name == "probe_cosine":
        return probe_cosine_run(summary, source)
    if run.claim == "probe":
        return probe_epochs_run(summary, source)
    return {"tail": tail_run, "soups": soups_run}[run.claim](summary, source)


def run_claims(claims: list[str], seeds: list[int], mode: str, work: Path, jsonl: Path, threads: int | None,
               invocation: str, only: set[str] | None = None) -> list[dict]:
    """Every run of every claim and seed (``only``: those runs by name), each record written to
    ``jsonl`` (and stdout) as it comes."""
    records: list[dict] = []
    head_t: dict[tuple[str, int], tuple[dict, str]] = {}  # (claim, seed) -> its full-budget run's (summary, path)
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    with jsonl.open("w") as out:
        for claim in claims:
            for seed in seeds:
                for run in plan(claim, mode):
                    if only and run.name not in only:
                        continue
                    cmd, run_dir = job_command(run, seed, work)
                    wall, reused = execute(cmd, threads)
                    path = run_dir / "summary.json"
                    summary, source = json.loads(path.read_text()), str(path)
                    if run.name in FULL_BUDGET_RUNS:
                        head_t[(claim, seed)] = (summary, source)
                    acc, ratios = measure(run, summary, source, head_t.get((claim, seed)))
                    compute = compute_fractions(run, summary, source, acc, ratios, head_t.get((claim, seed)))
                    rec = record(run, seed, mode, summary, path, acc, ratios, cmd, wall, reused, invocation,
                                 compute, stage_history(run_dir) if run.name in FULL_BUDGET_RUNS else None,
                                 epoch_fractions(run, summary, acc))
                    out.write(json.dumps(rec) + "\n")
                    out.flush()
                    emit(rec)
                    records.append(rec)
    return records


# ---------------------------------------------------------------- aggregation and targets


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1; None for one value)."""
    if not values:
        raise ValueError("mean_std of no values")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(records: list[dict]) -> list[dict]:
    """One row per claim and metric (in the order they first appear): mean, std, n over the seeds,
    with the dates, machines and invocations of the runs behind it."""
    groups: dict[tuple[str, str, str], dict] = {}
    for rec in records:
        for kind in ("acc", "ratios"):
            for metric, value in rec[kind].items():
                group = groups.setdefault((rec["claim"], kind, metric),
                                          {"values": {}, "dates": set(), "machines": set(), "invocations": set()})
                if rec["seed"] in group["values"]:
                    raise ValueError(f"two runs give {rec['claim']} {metric} for seed {rec['seed']}")
                group["values"][rec["seed"]] = float(value)
                group["dates"].add(rec["date"][:10])
                group["machines"].add(machine_label(rec["machine"]))
                group["invocations"].add(rec["invocation"])
    rows = []
    for (claim, kind, metric), group in groups.items():
        seeds = sorted(group["values"])
        mean, std = mean_std([group["values"][s] for s in seeds])
        dates = sorted(group["dates"])
        rows.append({"claim": claim, "kind": kind, "metric": metric, "mean": mean, "std": std, "n": len(seeds),
                     "seeds": seeds, "date": dates[0] if len(dates) == 1 else f"{dates[0]} .. {dates[-1]}",
                     "machine": "; ".join(sorted(group["machines"])),
                     "command": "; ".join(sorted(group["invocations"]))})
    return rows


PAIRED_CLAIMS = ("head", "fitted", "tail", "soups")  # claims whose methods compare seed by seed


def paired(records: list[dict]) -> list[dict]:
    """Per claim of PAIRED_CLAIMS, one row per method: its test accuracy's mean ± std over the
    seeds, its compute as a fraction of the full budget's (mean ± std, where measured) and, for
    each TWA of the claim (an accuracy named twa*), the paired difference TWA - method: the mean
    ± std over the seeds that gave both, each seed's TWA against the same seed's method."""
    acc: dict[str, dict[int, dict[str, float]]] = {}
    compute: dict[str, dict[int, dict[str, float]]] = {}
    epochs: dict[str, dict[int, dict[str, float]]] = {}
    for rec in records:
        if rec["claim"] in PAIRED_CLAIMS:
            acc.setdefault(rec["claim"], {}).setdefault(rec["seed"], {}).update(rec["acc"])
            compute.setdefault(rec["claim"], {}).setdefault(rec["seed"], {}).update(rec.get("compute") or {})
            epochs.setdefault(rec["claim"], {}).setdefault(rec["seed"], {}).update(rec.get("epochs_fraction") or {})
    rows = []
    for claim, by_seed in acc.items():
        methods = list(dict.fromkeys(m for values in by_seed.values() for m in values))
        references = [m for m in methods if m.startswith("twa")]
        for method in methods:
            seeds = sorted(s for s, values in by_seed.items() if method in values)
            mean, std = mean_std([by_seed[s][method] for s in seeds])
            costs = [compute[claim][s][method] for s in seeds if method in compute[claim].get(s, {})]
            cost_mean, cost_std = mean_std(costs) if costs else (None, None)
            nominal = [epochs[claim][s][method] for s in seeds if method in epochs[claim].get(s, {})]
            diffs = {}
            for ref in references:
                both = [s for s in seeds if ref in by_seed[s]]
                if ref != method and both:
                    d_mean, d_std = mean_std([by_seed[s][ref] - by_seed[s][method] for s in both])
                    diffs[ref] = {"mean": d_mean, "std": d_std, "n": len(both)}
            rows.append({"claim": claim, "method": method, "mean": mean, "std": std, "n": len(seeds),
                         "compute_mean": cost_mean, "compute_std": cost_std,
                         "epochs_fraction": nominal[0] if nominal else None, "diff": diffs,
                         "references": references})
    return rows


def _pm(mean: float | None, std: float | None, digits: int, sign: bool = False) -> str:
    if mean is None:
        return "n/a"
    value = f"{mean:+.{digits}f}" if sign else f"{mean:.{digits}f}"
    return f"{value} ± {'n/a' if std is None else f'{std:.{digits}f}'}"


def paired_table(claim_rows: list[dict]) -> list[str]:
    """One claim's rows of ``paired`` as a markdown table: a paired-difference column per TWA."""
    refs = claim_rows[0]["references"]
    lines = ["| method | mean ± std | n | " + " | ".join(f"{ref} - method" for ref in refs)
             + " | compute (s) | compute (epochs) |",
             "|---|---|---|" + "---|" * len(refs) + "---|---|"]
    for r in claim_rows:
        diffs = [("—" if ref == r["method"] else
                  (f"{_pm(r['diff'][ref]['mean'], r['diff'][ref]['std'], 2, sign=True)} (n={r['diff'][ref]['n']})"
                   if ref in r["diff"] else "n/a")) for ref in refs]
        lines.append(f"| {r['method']} | {_pm(r['mean'], r['std'], 2)} | {r['n']} | " + " | ".join(diffs)
                     + f" | {_pm(r['compute_mean'], r['compute_std'], 3)} | "
                     + ("n/a" if r["epochs_fraction"] is None else f"{r['epochs_fraction']:.3f}") + " |")
    return lines


PAIRED_CAPTION = ("test accuracy (%), mean ± std over the seeds; TWA - method paired by seed (points); compute "
                  "as a fraction of the full budget's, in compute seconds (mean ± std) and in epochs (a TWA "
                  "epoch counted as one)")


def paired_lines(rows: list[dict]) -> list[str]:
    """``paired`` as markdown: one table per claim, a paired-difference column per TWA."""
    lines: list[str] = []
    for claim in dict.fromkeys(r["claim"] for r in rows):
        lines += [f"**{claim}**: {PAIRED_CAPTION}", ""]
        lines += paired_table([r for r in rows if r["claim"] == claim]) + [""]
    return lines


def machine_label(m: dict) -> str:
    return f"{m.get('cpu')}, {m.get('cores')} cores" + (f", {m['gpu']}" if m.get("gpu") else "")


def format_mean_std(row: dict) -> str:
    digits, unit = (2, " %") if row["kind"] == "acc" else (3, "")
    std = "n/a" if row["std"] is None else f"{row['std']:.{digits}f}"
    return f"{row['mean']:.{digits}f} ± {std}{unit}"


@dataclass(frozen=True)
class Target:
    claim: str
    text: str
    check: Callable[[Callable[[str], float]], tuple[bool, str]]  # (mean of a metric) -> (met, measured)


def _versus(a_name: str, a: float, b_name: str, b: float) -> str:
    return f"{a_name} {a:.2f}% vs {b_name} {b:.2f}% ({a - b:+.2f} points)"


def _near_full_budget(twa: str, claim: str = "head") -> Target:
    label = twa.replace("twa_", "TWA-")

    def check(m):
        gap, cost = m(twa) - m("full_budget"), m(f"cost_ratio_{twa}")
        return gap >= -0.3 and cost <= 0.6, f"{_versus(label, m(twa), 'full budget', m('full_budget'))}, cost_ratio {cost:.3f}"
    return Target(claim, f"{label} within 0.3 points of the full budget (>= full budget - 0.3) at cost_ratio <= 0.6",
                  check)


def _beats_swa(twa: str, claim: str = "head") -> Target:
    label = twa.replace("twa_", "TWA-")
    return Target(claim, f"{label} >= SWA + 0.3 points",
                  lambda m: (m(twa) >= m("swa") + 0.3, _versus(label, m(twa), "SWA", m("swa"))))


def _beats_same_compute(twa: str, claim: str = "head") -> Target:
    """TWA against what a user with the same compute would run instead: SGD continued for TWA's epochs."""
    label = twa.replace("twa_", "TWA-")
    return Target(claim, f"{label} >= SGD at equal compute + 0.3 points",
                  lambda m: (m(twa) >= m("sgd_same_compute") + 0.3,
                             _versus(label, m(twa), "SGD at equal compute", m("sgd_same_compute"))))


def _soups(m) -> tuple[bool, str]:
    twa, greedy, best = m("twa_v"), m("greedy_soup"), m("best_individual")
    return (twa >= greedy >= best,
            f"TWA-v {twa:.2f}%, greedy soup {greedy:.2f}%, best single model {best:.2f}%")


TARGETS = (
    _near_full_budget("twa_t"), _near_full_budget("twa_v"), _beats_swa("twa_t"), _beats_swa("twa_v"),
    _beats_same_compute("twa_t"), _beats_same_compute("twa_v"),
    _near_full_budget("twa_t", "fitted"), _beats_swa("twa_t", "fitted"), _beats_same_compute("twa_t", "fitted"),
    Target("tail", "TWA >= SWA", lambda m: (m("twa") >= m("swa"), _versus("TWA", m("twa"), "SWA", m("swa")))),
    Target("bits", "4-bit within 0.2 points of 32-bit (>= 32-bit - 0.2)",
           lambda m: (m("bits=4") >= m("bits=32") - 0.2, _versus("4-bit", m("bits=4"), "32-bit", m("bits=32")))),
    Target("soups", "TWA-v >= greedy soup >= best single model", _soups),
)


class _NotMeasured(Exception):
    """A target's metric that no run gave (e.g. ``--runs`` left its run out)."""


def evaluate_targets(rows: list[dict]) -> list[dict]:
    """Each target of a claim in ``rows``, on the means: {claim, target, measured, met, n}. A
    target whose metrics the runs did not all give is left out, with a note naming the metric."""
    means = {(r["claim"], r["metric"]): r for r in rows}
    out = []
    for target in TARGETS:
        if not any(claim == target.claim for claim, _ in means):
            continue  # the claim did not run

        used: list[int] = []  # the seed counts of the metrics the target compares

        def mean(metric: str, claim: str = target.claim) -> float:
            if (claim, metric) not in means:
                raise _NotMeasured(metric)
            used.append(means[(claim, metric)]["n"])
            return means[(claim, metric)]["mean"]
        try:
            met, measured = target.check(mean)
        except _NotMeasured as missing:
            note(f"target {target.claim}: {target.text}: not evaluated, no run of {target.claim} gave {missing}")
            continue
        n = min(used)
        out.append({"claim": target.claim, "target": target.text, "measured": measured, "met": met, "n": n})
    return out


def target_line(t: dict) -> str:
    return f"target {t['claim']}: {t['target']} | {t['measured']} (means, n = {t['n']}) | " + (
        "met" if t["met"] else "not met")


# ---------------------------------------------------------------- outputs


def write_markdown(path: Path, rows: list[dict], targets: list[dict], modes: list[str],
                   records: list[dict] | None = None) -> None:
    from twa_ray.output.atomic import atomic_path

    lines = ["# The paper's claims, reproduced", "",
             f"Written by `benchmarks/reproduce.py` (mode: {', '.join(modes)}). Accuracies: test accuracy (%), "
             "mean ± sample std over the seeds. cost_ratio / wall_ratio: (base training + TWA) / full budget, "
             "in compute / wall seconds; twa_epoch_vs_sgd_epoch: a TWA epoch's compute per example over a "
             "base-training epoch's.", "",
             "| claim | method | mean ± std | n seeds | command | date | machine |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['claim']} | {r['metric']} | {format_mean_std(r)} | {r['n']} | `{r['command']}` | {r['date']} "
              f"| {r['machine']} |" for r in rows]
    pairs = paired_lines(paired(records)) if records else []
    if pairs:
        lines += ["", "## Paired by seed", ""] + pairs
    lines += ["", "## Targets (means over the seeds)", "", "| claim | target | measured | |", "|---|---|---|---|"]
    lines += [f"| {t['claim']} | {t['target']} | {t['measured']} | {'met' if t['met'] else 'not met'} |"
              for t in targets]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, rows: list[dict]) -> None:
    """One panel per claim: each method's mean test accuracy, the std as an error bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from twa_ray.output.atomic import atomic_path

    claims = list(dict.fromkeys(r["claim"] for r in rows if r["kind"] == "acc"))
    fig, axes = plt.subplots(1, max(1, len(claims)), figsize=(4.2 * max(1, len(claims)), 4.2), squeeze=False)
    for ax, claim in zip(axes[0], claims):
        acc = [r for r in rows if r["claim"] == claim and r["kind"] == "acc"]
        means, stds = [r["mean"] for r in acc], [r["std"] or 0.0 for r in acc]
        bars = ax.bar(range(len(acc)), means, yerr=stds, capsize=3, color="tab:blue", alpha=0.7)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, label_type="center")
        ax.set_xticks(range(len(acc)), [r["metric"] for r in acc], rotation=45, ha="right", fontsize=8)
        low = min(m - s for m, s in zip(means, stds))
        high = max(m + s for m, s in zip(means, stds))
        ax.set_ylim(max(0.0, low - 0.2 * (high - low) - 0.5), min(100.0, high + 0.1 * (high - low) + 0.5))
        n = min(r["n"] for r in acc)
        ax.set_title(f"{claim} ({n} seed{'s' if n > 1 else ''})")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


README_BEGIN = "<!-- reproduce.py results: begin -->"
README_END = "<!-- reproduce.py results: end -->"


CLAIM_TITLES = {
    "head": "Head stage: TWA after half the schedule, against the full budget and SGD at equal compute",
    "fitted": "Fitted: the paper's regime, where the network fits its data after the lr decay",
    "tail": "Tail stage: TWA against SWA and EMA over the constant-lr tail",
    "bits": "Bits and bases of the projection",
    "probe": "Probe: TWA trained to convergence in the head stage's span",
    "soups": "Soups of fine-tuned models: TWA-v against the uniform and the greedy soup",
}


def record_commit(rec: dict) -> str:
    """The commit a line was measured at (the rebased one where the line names it), or "not recorded"."""
    m = rec.get("machine") or {}
    rebased = m.get("git_commit_rebased")
    return (rebased.split()[0] if rebased else m.get("git_commit")) or "not recorded"


def claim_sources(records: list[dict], claim: str) -> list[str]:
    """Each invocation behind ``claim``'s lines, as its user typed it, with the dates and commits of its runs."""
    sources: dict[str, tuple[set, set]] = {}
    for rec in records:
        if rec["claim"] == claim:
            dates, commits = sources.setdefault(rec["invocation"], (set(), set()))
            dates.add(rec["date"][:10])
            commits.add(record_commit(rec))
    return [f"{command}   # {', '.join(sorted(dates))}, commit {', '.join(sorted(commits))}"
            for command, (dates, commits) in sources.items()]


def readme_section(rows: list[dict], targets: list[dict], records: list[dict]) -> str:
    """The README's results block: the machines, named once; then per claim a heading, the
    commands behind it (each with its runs' dates and commits), its methods (paired by seed where
    the claim compares them seed by seed: ``paired_table``; else mean ± std), its ratios and its
    targets, each met or not."""
    machines: dict[str, set] = {}
    for rec in records:
        machines.setdefault(machine_label(rec["machine"]), set()).add(rec["date"][:10])
    lines = [README_BEGIN, "",
             "Machines: " + "; ".join(f"{label} ({', '.join(sorted(dates))})" for label, dates in machines.items())
             + ". Accuracies: test accuracy (%), mean ± sample std over the seeds.", ""]
    pairs = paired(records)
    for claim in dict.fromkeys(r["claim"] for r in rows):
        lines += [f"### {CLAIM_TITLES.get(claim, claim)}", "", "```bash", *claim_sources(records, claim), "```", ""]
        claim_pairs = [r for r in pairs if r["claim"] == claim]
        if claim_pairs:
            lines += [PAIRED_CAPTION[0].upper() + PAIRED_CAPTION[1:] + ":", ""] + paired_table(claim_pairs) + [""]
        else:
            lines += ["| method | mean ± std | seeds |", "|---|---|---|"]
            lines += [f"| {r['metric']} | {format_mean_std(r)} | {r['n']} |"
                      for r in rows if r["claim"] == claim and r["kind"] == "acc"] + [""]
        ratios = [r for r in rows if r["claim"] == claim and r["kind"] == "ratios"]
        if ratios:
            lines += ["| ratio | mean ± std | seeds |", "|---|---|---|"]
            lines += [f"| {r['metric']} | {format_mean_std(r)} | {r['n']} |" for r in ratios] + [""]
        claim_targets = [t for t in targets if t["claim"] == claim]
        if claim_targets:
            lines += ["| target | measured | |", "|---|---|---|"]
            lines += [f"| {t['target']} | {t['measured']} | {'met' if t['met'] else '**not met**'} |"
                      for t in claim_targets] + [""]
    lines.append(README_END)
    return "\n".join(lines)


ANSWER_BEGIN = "<!-- reproduce.py answer: begin -->"
ANSWER_END = "<!-- reproduce.py answer: end -->"
ANSWER_CLAIMS = ("fitted", "head")  # the settings of "Does TWA help?", in its columns' order
ANSWER_METHODS = (
    ("twa_t", "TWA-t (TWA on train)"), ("twa_v", "TWA-v (TWA on val)"),
    ("twa_t_ema_candidates", "TWA-t over the EMA's candidates"), ("ema", "EMA of the weights"), ("swa", "SWA"),
    ("last", "last candidate"), ("best_k", "best-k"), ("sgd_same_compute", "SGD at equal compute"),
    ("full_budget", "full budget"),
)


def answer_table(records: list[dict]) -> list[str]:
    """The README's "Does TWA help?" table: per setting of ANSWER_CLAIMS each method's test
    accuracy (mean ± std) and TWA-t - method paired by seed; cost: the method's epochs as a
    fraction of the full budget's (a TWA epoch counted as one SGD epoch), or where it has no SGD
    epochs (TWA-v) its compute seconds' fraction, marked (s)."""
    pairs = {(r["claim"], r["method"]): r for r in paired(records)}
    claims = [c for c in ANSWER_CLAIMS if (c, "twa_t") in pairs]
    seeds = {c: max(r["n"] for (claim, _), r in pairs.items() if claim == c) for c in claims}
    lines = ["| method | " + " | ".join(f"**{c}** ({seeds[c]} seeds): acc | TWA-t − X" for c in claims) + " | cost |",
             "|---|" + "---|---|" * len(claims) + "---|"]
    for method, label in ANSWER_METHODS:
        cells, costs = [], []
        for c in claims:
            r = pairs.get((c, method))
            if r is None:
                cells += ["not run", ""]
                continue
            diff = r["diff"].get("twa_t")
            text = "" if diff is None else _pm(diff["mean"], diff["std"], 2, sign=True).replace("-", "−")
            cells += [_pm(r["mean"], r["std"], 2), f"**{text}**" if text and method == "sgd_same_compute" else text]
            if r["epochs_fraction"] is not None:
                costs.append(f"{r['epochs_fraction']:.2f}")
            elif r["compute_mean"] is not None:  # TWA-v: its epochs are over the val split; its seconds
                costs.append(f"{r['compute_mean']:.2f} (s)")
        if any(cell != "not run" and cell for cell in cells[::2]):
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {' / '.join(dict.fromkeys(costs)) or 'n/a'} |")
    return lines


def write_readme(path: Path, rows: list[dict], targets: list[dict], records: list[dict]) -> None:
    """Replace the block between README_BEGIN and README_END in ``path`` by ``readme_section``,
    and, where ``path`` has one and the records hold a claim of ANSWER_CLAIMS, the block between
    ANSWER_BEGIN and ANSWER_END by ``answer_table``; SystemExit naming the file when the results
    markers are missing (nothing is written then)."""
    from twa_ray.output.atomic import atomic_path

    text = replace_block(path.read_text(), README_BEGIN, README_END, readme_section(rows, targets, records), path)
    if ANSWER_BEGIN in text and any(rec["claim"] in ANSWER_CLAIMS for rec in records):
        table = "\n".join([ANSWER_BEGIN, *answer_table(records), ANSWER_END])
        text = replace_block(text, ANSWER_BEGIN, ANSWER_END, table, path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def merged_records(paths: list[Path]) -> list[dict]:
    """The lines of reproduce.jsonl files, one per (claim, seed, run): where several files hold
    the same run (a run reused by a later invocation, or run again), the last file's line. In
    the order a single invocation writes them (claims, then each claim's runs, then seeds), so
    the tables list each claim's methods in the same order however the runs were split up."""
    merged: dict[tuple, dict] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                merged[(rec["claim"], rec["seed"], rec["run"])] = rec
    runs: dict[tuple[str, str], list[str]] = {}

    def order(rec: dict) -> tuple:
        claim, mode = rec["claim"], rec.get("mode", "full")
        if claim not in CLAIMS:
            return len(CLAIMS), 0, rec["seed"]
        names = runs.setdefault((claim, mode), [r.name for r in plan(claim, mode)])
        return CLAIMS.index(claim), names.index(rec["run"]) if rec["run"] in names else len(names), rec["seed"]
    return sorted(merged.values(), key=order)


def report(records: list[dict], out: Path, readme: Path | None = None) -> list[dict]:
    """reproduce.md and reproduce.png in ``out``, the table and targets on stderr; returns the targets."""
    rows = aggregate(records)
    targets = evaluate_targets(rows)
    width = max(len(f"{r['claim']} {r['metric']}") for r in rows)
    for r in rows:
        note(f"{(r['claim'] + ' ' + r['metric']).ljust(width)}  {format_mean_std(r)}  (n={r['n']})")
    for t in targets:
        note(target_line(t))
    for line in paired_lines(paired(records)):
        note(line)
    write_markdown(out / "reproduce.md", rows, targets, sorted({rec["mode"] for rec in records}), records)
    write_plot(out / "reproduce.png", rows)
    note(f"wrote {out / 'reproduce.md'} and {out / 'reproduce.png'}")
    if readme is not None:
        write_readme(readme, rows, targets, records)
        note(f"wrote the results section of {readme}")
    return targets


# ---------------------------------------------------------------- main


def prepare_work(work: Path, fresh: bool) -> None:
    if fresh and work.exists():
        if not (work / WORK_MARK).exists():
            raise SystemExit(f"--fresh: {work} was not made by benchmarks/reproduce.py ({WORK_MARK} missing): "
                             "not removing it")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / WORK_MARK).touch()


def parse_claims(text: str) -> list[str]:
    wanted = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in CLAIMS]
    if unknown or not wanted:
        raise argparse.ArgumentTypeError(f"unknown claims {unknown or text!r}: choose from {','.join(CLAIMS)}")
    return [c for c in CLAIMS if c in wanted]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(parser)
    parser.add_argument("--claims", type=parse_claims, default=list(CLAIMS), help=f"comma-separated: {','.join(CLAIMS)}")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0 .. N-1 (default 3; 1 with --quick, --smoke)")
    parser.add_argument("--seed-list", default=None,
                        help="comma-separated seeds instead of 0 .. N-1 (e.g. 2: only seed 2, whose lines --results "
                             "merges with another invocation's)")
    parser.add_argument("--out", default=None, help="where reproduce.{jsonl,md,png} go")
    parser.add_argument("--work", default=None, help="run folders (default runs/reproduce/<mode>)")
    parser.add_argument("--fresh", action="store_true", help="empty --work first: run everything again")
    parser.add_argument("--runs", default=None,
                        help="comma-separated run names of the claims (e.g. bits_4,bits_32): only those")
    parser.add_argument("--results", nargs="+", default=None,
                        help="reproduce.jsonl files: only write their tables, plot and targets (a run in several: "
                             "the last file's line)")
    parser.add_argument("--merged", default=None, help="with --results: also write their lines, merged, to this file")
    parser.add_argument("--readme", default=None,
                        help="also write the tables and targets into this file's results block (README.md)")
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    if args.results:
        records = merged_records([Path(p) for p in args.results])
        if args.merged:
            write_jsonl(args.merged, records)
        report(records, Path(args.out or Path(args.results[0]).parent), Path(args.readme) if args.readme else None)
        return 0
    work = Path(args.work or ROOT / "runs" / "reproduce" / mode).resolve()
    out = Path(args.out or (ROOT / "benchmarks" / "results" if mode == "full" else work)).resolve()
    if args.seed_list is not None:
        if args.seeds is not None:
            parser.error("give --seeds or --seed-list, not both")
        try:
            seeds = sorted({int(s) for s in args.seed_list.split(",") if s.strip()})
        except ValueError:
            parser.error(f"--seed-list {args.seed_list!r}: comma-separated integers, e.g. 0,2")
        if not seeds or min(seeds) < 0:
            parser.error(f"--seed-list {args.seed_list!r}: one or more seeds >= 0")
    else:
        seeds = list(range(args.seeds if args.seeds is not None else SEEDS[mode]))
    if not seeds:
        parser.error("--seeds must be >= 1")
    only = {r.strip() for r in args.runs.split(",") if r.strip()} if args.runs else None
    if only:
        names = {run.name for claim in args.claims for run in plan(claim, mode)}
        if only - names:
            parser.error(f"--runs: {', '.join(sorted(only - names))} is no run of {','.join(args.claims)} "
                         f"(runs: {', '.join(sorted(names))})")
    prepare_work(work, args.fresh)
    invocation = as_typed(["python", "benchmarks/reproduce.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        records = run_claims(args.claims, seeds, mode, work, out / "reproduce.jsonl", args.threads, invocation, only)
    except SummaryError as exc:
        raise SystemExit(f"error: {exc}") from None
    report(records, out, Path(args.readme) if args.readme else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
