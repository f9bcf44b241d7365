"""Start-up of each Ray Train stage, split into its parts, against Ray's own floor.

    python benchmarks/startup.py [--smoke] [--config configs/quickstart.yaml] [--out PATH] [a.b=value ...]

One run, one local Ray (``ray_env.init_ray``, all the machine's CPUs), in this order:

    bare         an empty loop on the trainer ``runtime.trainer.torch_trainer`` builds with the
                 same ``WorkerGroup`` (ScalingConfig, runtime env, logging) as base training (one
                 CPU worker: TorchTrainer's base class, no process group): Ray's floor; the first
                 Train run of the process (cold)
    base         base training (``run_base_training``)
    full_budget  the full-budget continuation (``run_full_budget_training``); not with --smoke
    twa          TWA (``run_twa``) on base training's candidates
    evaluation   the test evaluation of the last candidate in Ray tasks (``evaluate_parallel``);
                 not with --smoke
    bare_process_group   the empty loop on a TorchTrainer with its gloo process group, as one
                 worker had before; not with --smoke
    bare_again   the empty loop again, after the stages: the warm floor; not with --smoke

The workers mark their start-up in a trace file (``runtime.trainer_trace``: on only because
this script sets ``TWA_RAY_STARTUP_TRACE`` before starting Ray; times since the driver's
``fit()`` call). Per stage one JSON line (stdout; with a full run also
benchmarks/results/startup.jsonl, --out elsewhere), seconds:

    stage, workers, fit_s (the driver's fit(), all of it), startup_s (fit() -> the last rank's
    set-up done: loop_called for the empty loop), compute_s (fit_s - startup_s: training,
    reports, teardown), driver_prep_s (the stage function's own work before fit()),
    controller_s (fit() -> the Train controller's process up; None when Ray reused one),
    worker_actors_s (-> the last worker process up), process_group_s (-> the loop called: Ray's
    worker-group start, the gloo/NCCL process group, the loop's dispatch), imports_s (the loop's
    module imported), data_s, store_s, native_s (the native kernel's build or cached load),
    resume_s, first_round_s (TWA: candidates read into the projection), setup_other_s (the rest
    of the loop's set-up: model, optimizer, sharding mode), floor_s (the bare run's startup_s:
    the warm one when there is one), ratio_to_floor, target_ratio (1.5), meets_target.

The evaluation runs in Ray tasks, not Ray Train: its startup_s is ``EvaluationRun.wall_s -
compute_s`` and its parts are None. Every record has ``machine()`` (max_load_avg_1m: the highest
load seen during the run; a busy machine slows start-up more than compute). A full run takes
about 2 minutes on 2 idle cores; --smoke (tests) about 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

from _common import ROOT, emit, machine, note, utc_date, write_jsonl

TARGET_RATIO = 1.5
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "startup.jsonl"

FULL = ["data.limit_train=2048", "data.limit_val=512", "train.epochs=2", "train.budget_epochs=3",
        "train.save_every_steps=8", "twa.candidates=last:4"]
SMOKE = ["data.limit_train=512", "data.limit_val=128", "train.epochs=1", "train.budget_epochs=2",
         "train.save_every_steps=2", "twa.candidates=all"]
PARTS = ("data", "store", "native", "resume", "first_round")


def empty_loop(config: dict) -> None:
    """The floor's loop: marks that Ray called it, nothing else."""
    from twa_ray.runtime import trainer_trace

    trainer_trace.loop_called()
    trainer_trace.mark("loop_done")


class FitClock:
    """The driver's time.time() at each trainer's fit() call (patched for this run only): the
    TorchTrainer's, and its base class's where a stage needs no process group."""

    def __init__(self) -> None:
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

        self.calls: list[float] = []
        original = DataParallelTrainer.fit

        def fit(trainer, *args, **kwargs):
            self.calls.append(time.time())
            return original(trainer, *args, **kwargs)

        DataParallelTrainer.fit = fit


def read_trace(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _durations(events: list[dict], part: str) -> float:
    """Seconds spent in ``part`` on one rank: outermost start/done pairs (wrappers nest)."""
    total, depth, start = 0.0, 0, 0.0
    for e in events:
        if e["event"] == f"{part}_start":
            if depth == 0:
                start = e["t"]
            depth += 1
        elif e["event"] == f"{part}_done" and depth:
            depth -= 1
            if depth == 0:
                total += e["t"] - start
    return total


def split(events: list[dict], t_fit: float) -> dict:
    """The parts of one Train run's start-up from its trace events (all after ``t_fit``)."""
    ranked = [e for e in events if e.get("rank") is not None]
    rank_pids = {e["pid"] for e in ranked}
    by_rank: dict[str, list[dict]] = {}
    for e in ranked:
        by_rank.setdefault(e["rank"], []).append(e)
    starts = {e["pid"]: e["t"] for e in events if e["event"] == "process_start"}
    others = sorted(t for pid, t in starts.items() if pid not in rank_pids and t >= t_fit)
    worker_up = max((starts.get(pid, t_fit) for pid in rank_pids), default=t_fit)
    out: dict = {"controller_s": round(others[0] - t_fit, 3) if others else None,
                 "worker_actors_s": round(max(0.0, worker_up - t_fit), 3)}
    called = imported = done = None
    parts = {p: 0.0 for p in PARTS}
    setup = 0.0
    for rank_events in by_rank.values():
        times = {e["event"]: e["t"] for e in reversed(rank_events)}  # the first of each event
        called = max(called or 0.0, times.get("loop_called", t_fit))
        imported = max(imported or 0.0, times.get("imports_done", times.get("loop_called", t_fit)))
        ends = [times[k] for k in ("imports_done", "setup_done", "resume_done", "first_round_done", "loop_called")
                if k in times]
        done = max(done or 0.0, max(ends, default=t_fit))
        for p in PARTS:
            parts[p] = max(parts[p], _durations(rank_events, p))
        setup = max(setup, _durations(rank_events, "setup"))
    called, imported, done = called or t_fit, imported or t_fit, done or t_fit
    out["process_group_s"] = round(max(0.0, called - worker_up), 3)
    out["imports_s"] = round(imported - called, 3)
    for p in PARTS:
        out[f"{p}_s"] = round(parts[p], 3)
    inside_setup = parts["data"] + parts["store"] + parts["native"]
    out["setup_other_s"] = round(max(0.0, setup - inside_setup), 3)
    out["startup_s"] = round(done - t_fit, 3)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tests: bare, base and TWA on 512 images")
    parser.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    parser.add_argument("--out", default=None, help=f"JSON lines file (default with a full run: {DEFAULT_OUT})")
    parser.add_argument("overrides", nargs="*", help="config overrides a.b=value (after the script's own)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="twa-startup-"))
    trace = work / "trace.jsonl"
    os.environ["TWA_RAY_STARTUP_TRACE"] = str(trace)  # before ray.init: every worker inherits it
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")

    from twa_ray.config import load_config
    from twa_ray.config.locations import settle_locations
    from twa_ray.runtime.ray_env import init_ray

    overrides = (SMOKE if args.smoke else FULL) + [f"output_dir={work / 'run'}",
                                                   f"name=startup-{uuid.uuid4().hex[:6]}"] + list(args.overrides)
    cfg = settle_locations(load_config(args.config, overrides))
    started = time.perf_counter()
    init_ray(num_cpus=os.cpu_count())
    note(f"ray.init: {time.perf_counter() - started:.1f} s")

    from twa_ray.runtime.base_train import run_base_training, run_full_budget_training
    from twa_ray.runtime.evaluation import evaluate_parallel
    from twa_ray.runtime.trainer import WorkerGroup, torch_trainer
    from twa_ray.runtime.twa_train import run_twa
    from twa_ray.store import CandidateStore

    clock = FitClock()
    rows: list[dict] = []
    state: dict = {}

    def bare():
        result = torch_trainer(empty_loop, {}, WorkerGroup.of(cfg.train), name=f"bare-{uuid.uuid4().hex[:8]}",
                               storage_path=str(work / "ray"), max_failures=0).fit()
        if result.error is not None:
            raise result.error

    def bare_process_group():
        # fsdp=True only forces the gloo process group that one CPU worker no longer sets up: the
        # TorchTrainer every stage ran on before (its start-up against bare_again's: the saving)
        workers = dataclasses.replace(WorkerGroup.of(cfg.train), fsdp=True)
        result = torch_trainer(empty_loop, {}, workers, name=f"bare-pg-{uuid.uuid4().hex[:8]}",
                               storage_path=str(work / "ray"), max_failures=0).fit()
        if result.error is not None:
            raise result.error

    def base():
        state["base"] = run_base_training(cfg)

    def full_budget():
        run_full_budget_training(cfg, state["base"])

    def twa():
        run_twa(cfg)

    def evaluation():
        store = CandidateStore.open(cfg.store_uri)
        run = evaluate_parallel(cfg, {"last": store.candidate_indices()[-1]}, cfg.store_uri, cwd=os.getcwd())
        state["eval"] = run

    stages = [("bare", bare, cfg.train.workers), ("base", base, cfg.train.workers)]
    if not args.smoke:
        stages.append(("full_budget", full_budget, cfg.train.workers))
    stages.append(("twa", twa, cfg.twa.workers))
    if not args.smoke:
        stages += [("evaluation", evaluation, None), ("bare_process_group", bare_process_group, cfg.train.workers),
                   ("bare_again", bare, cfg.train.workers)]

    for stage, fn, workers in stages:
        note(f"{stage} ...")
        before = len(read_trace(trace))
        calls = len(clock.calls)
        t_call = time.time()
        fn()
        t_end = time.time()
        events = read_trace(trace)[before:]
        row: dict = {"benchmark": "startup", "stage": stage, "workers": workers, "fit_s": None}
        if stage == "evaluation":
            run = state["eval"]
            row.update({"fit_s": round(run.wall_s, 3), "startup_s": round(run.wall_s - run.compute_s, 3),
                        "compute_s": round(run.compute_s, 3), "driver_prep_s": None, "tasks": run.tasks})
        else:
            t_fit = clock.calls[calls]
            row.update(split(events, t_fit))
            row["fit_s"] = round(t_end - t_fit, 3)
            row["compute_s"] = round(row["fit_s"] - row["startup_s"], 3)
            row["driver_prep_s"] = round(t_fit - t_call, 3)
        rows.append(row)
        note(f"{stage}: start-up {row['startup_s']:.1f} s of {row['fit_s']:.1f} s")

    bares = [r for r in rows if r["stage"] in ("bare", "bare_again")]
    floor = bares[-1]["startup_s"]
    date, mach = utc_date(), machine()
    for r in rows:
        r["floor_s"] = floor
        r["ratio_to_floor"] = round(r["startup_s"] / floor, 2) if floor else None
        r["target_ratio"] = TARGET_RATIO
        r["meets_target"] = r["ratio_to_floor"] is not None and r["ratio_to_floor"] <= TARGET_RATIO
        r.update({"mode": "smoke" if args.smoke else "full", "date": date, "machine": mach})
        emit(r)
    out = args.out or (None if args.smoke else DEFAULT_OUT)
    if out:
        note(f"wrote {write_jsonl(out, rows)}")
    note(f"total {time.perf_counter() - started:.0f} s")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
