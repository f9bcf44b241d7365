"""The main job's five stages (jobs/cifar_twa.py), one call each:

    ensure_candidates  base training on Ray Train -> the candidate store (or the store it already filled)
    train_twa          sharded TWA on Ray Train over the stored candidates
    train_full_budget  optional: base training continued to the end of its schedule (the full budget)
    train_sgd_same_compute  with the full budget: base training continued for TWA's epochs, the
                       rest of the schedule compressed into them (SGD at equal compute)
    evaluate_run       test accuracy of last, SWA, EMA, best-k, TWA (the full budget, SGD at equal
                       compute), in parallel tasks
    write_run          the run folder (``output.run_folder``), then config.json: the run is complete

Ray must be running (``runtime.ray_env.init_ray``) before the first stage. Before it,
``check_candidate_count`` checks in the driver that ``twa.candidates`` will select at least two
of the candidates base training is about to save.

Every model gets the same BatchNorm recalibration (``twa.bn_batches`` shuffled training
batches). The methods compared, their order in summary.json and the candidates each
baseline averages (its members rule) come from the registry ``output.methods``
(``job_methods("main")``); the stages here make the weights no rule picks (EMA, the full
budget, SGD at equal compute, TWA).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config, check_twa_start, config_to_dict, recorded_config, select_candidates, without_locations
from ..core.baselines import INITIAL_KIND
from ..core.params import ParamLayout
from ..runtime.evaluation import Evaluated, EvaluationRun, evaluate_parallel
from ..output.methods import MAIN, job_methods
from ..output.mixing import run_mixing
from ..output.plots import plot_accuracy
from ..output.run_folder import stage_rows, write_run_folder
from ..store import CandidateStore
from ..tasks import model_spec, task_from_config, task_summary
from .runs import require_same_settings, write_complete_run

log = logging.getLogger(__name__)

# Config sections that decide what base training produces: a store made with other
# values holds other candidates.
CANDIDATE_SECTIONS = ("seed", "data", "model", "train")
# ... and the EMA base training keeps beside them (compared when the store recorded them)
EMA_KEYS = ("ema_decay", "ema_warmup")


def _candidate_settings(raw: dict) -> dict:
    # where the dataset's files are read from (data.root) does not change the candidates: a
    # moved checkout, or a `ray job submit` working dir, reuses its store
    raw = without_locations(raw)
    out = {k: raw.get(k) for k in CANDIDATE_SECTIONS}
    if isinstance(raw.get("baselines"), dict):
        out["baselines"] = {k: raw["baselines"].get(k) for k in EMA_KEYS}
    return out


def check_candidate_count(cfg: Config, num_train: int) -> list[int]:
    """Before base training: the positions (into the candidates base training will save from
    ``num_train`` training examples) that ``twa.candidates`` selects. Raises ValueError
    naming twa.candidates and the count when fewer than two remain (TWA would fail only
    after base training), ConfigError when twa.start is out of their range."""
    from ..runtime.base_loop import candidate_steps, epoch_steps

    tc = cfg.train
    steps_per_epoch = epoch_steps(num_train, cfg.data.batch_size, tc.workers)
    if steps_per_epoch == 0:  # base training names data.batch_size
        return []
    count = len(candidate_steps(tc, steps_per_epoch))
    chosen = select_candidates(cfg.twa.candidates, count)
    if len(chosen) < 2:
        raise ValueError(
            f"TWA needs at least two candidates to span a subspace; twa.candidates={cfg.twa.candidates!r} selects "
            f"{len(chosen)} of the {count} base training will save (train.epochs={tc.epochs} of {steps_per_epoch} "
            f"steps, train.save_initial={tc.save_initial}, train.save_every_steps={tc.save_every_steps}, "
            f"train.save_from_epoch={tc.save_from_epoch}): checked before base training"
        )
    check_twa_start(cfg.twa, len(chosen))
    return chosen


def check_store_settings(cfg: Config) -> CandidateStore | None:
    """The candidate store at ``cfg.store_uri`` when its candidates were made with ``cfg``'s
    settings (``CANDIDATE_SECTIONS``, and the EMA keys when it recorded them), None when there
    is none yet; ConfigError naming the sections that differ otherwise
    (``runs.require_same_settings``). Needs no Ray: jobs call it before Ray starts."""
    try:
        store = CandidateStore.open(cfg.store_uri)
    except FileNotFoundError:
        return None
    stored = _candidate_settings(recorded_config(store.meta.get("config", {})))
    keys = CANDIDATE_SECTIONS + (("baselines",) if "baselines" in stored else ())
    require_same_settings(f"the candidate store {store.uri}", stored, _candidate_settings(config_to_dict(cfg)), keys,
                          elsewhere="output_dir or store")
    return store


def ensure_candidates(cfg: Config):
    """Stage 1: the base-training result behind ``cfg.store_uri``: reused when the store is
    complete for the same settings (its last checkpoint found through the store's record of
    the run), else (re)made by base training on Ray Train (which resumes a partial run). A
    store made with different settings is an error naming the section."""
    from ..runtime.base_train import BaseTrainResult, checkpoint_info, latest_checkpoint, run_base_training

    store = check_store_settings(cfg)
    if store is None:
        return run_base_training(cfg)
    infos = [c.info for c in store.list_candidates()]
    epochs = [i for i in infos if i.get("kind") == "epoch"]
    if not any(i.get("epoch") == cfg.train.epochs for i in epochs):
        return run_base_training(cfg)
    checkpoint = latest_checkpoint(store.meta["base_run"]) if store.meta.get("base_run") else None
    if checkpoint is not None and checkpoint_info(checkpoint).get("epoch") != cfg.train.epochs:
        checkpoint = None
    if checkpoint is None:
        log.warning("base training's last checkpoint is gone: no EMA, and the full budget (if compared) trains "
                    "from the start")
    log.info("reusing the %d candidates in %s", len(infos), store.uri)
    return BaseTrainResult(store.uri, len(infos), [i.get("metrics", {}) for i in epochs], 0.0,
                           checkpoint_path=checkpoint)


def train_twa(cfg: Config, base):
    """Stage 2: TWA on ``cfg.twa.workers`` Ray Train workers, each with a column shard of the projection."""
    from ..runtime.twa_train import run_twa

    return run_twa(cfg, base.store_uri)


def train_full_budget(cfg: Config, base):
    """Stage 3: with ``compare_full_budget``, base training continued from ``base``'s last
    checkpoint to the end of its schedule (no candidates kept); else None."""
    if not cfg.compare_full_budget:
        return None
    from ..runtime.base_train import run_full_budget_training

    return run_full_budget_training(cfg, base)


def twa_total_epochs(cfg: Config, twa) -> int:
    """TWA's epochs over all its rounds (summary.json's ``epochs.twa``)."""
    return cfg.twa.epochs * len(twa.rounds)


def train_sgd_same_compute(cfg: Config, base, twa):
    """Stage 3b: with ``compare_full_budget``, SGD at equal compute: base training continued
    from ``base``'s last checkpoint for TWA's epochs (all rounds), the rest of the schedule
    compressed into them (no candidates kept); else None (and None without that checkpoint)."""
    if not cfg.compare_full_budget:
        return None
    from ..runtime.base_train import run_sgd_same_compute_training

    return run_sgd_same_compute_training(cfg, base, twa_total_epochs(cfg, twa))


@dataclass
class RunEvaluation:
    """What stage 4 measured: ``run.results`` per method (and "cand:<index>" with
    ``eval.candidates``), and the candidates behind each averaged baseline."""

    run: EvaluationRun
    members: dict[str, list[int]] = field(default_factory=dict)  # per method with a members rule, and "twa"
    initial: list[int] = field(default_factory=list)  # the stored initial weights' indices

    @property
    def results(self) -> dict[str, Evaluated]:
        return self.run.results


def evaluate_run(cfg: Config, base, twa, full=None, same=None) -> RunEvaluation:
    """Stage 4: test accuracy of last, SWA, EMA, best-k, TWA (with its state_dict), the
    full budget and SGD at equal compute (``same``), each once, in parallel Ray tasks; with
    ``eval.candidates`` every stored candidate too ("cand:<index>", and a method of one
    candidate, "last", is its result). A baseline with nothing to average (no val accuracies
    for best-k, no EMA) or not trained (no full budget) is left out."""
    from ..runtime.base_train import read_final

    store = CandidateStore.open(base.store_uri)
    infos = {c.index: c.info for c in store.list_candidates()}
    chosen = sorted({c for r in twa.rounds for c in r})
    # The baselines take every stored candidate, whichever window (twa.candidates) TWA learns
    # over: SWA is SWA's recipe, not TWA's subset of it.
    pairs = sorted(infos.items())
    members = {m.name: m.members(pairs, cfg) for m in job_methods(MAIN) if m.members is not None}
    sources: dict = {}
    aliases: dict[str, str] = {}  # a method whose one member is an evaluated candidate: its result
    if cfg.eval.candidates:
        sources.update({f"cand:{c}": c for c in infos})
    for name, picked in members.items():
        if len(picked) == 1 and cfg.eval.candidates:
            aliases[name] = f"cand:{picked[0]}"
        elif picked:  # an average of one candidate is that candidate
            sources[name] = picked[0] if len(picked) == 1 else picked
    members["twa"] = chosen
    layout = ParamLayout(tuple(store.names), tuple(tuple(s) for s in store.shapes))
    if base.checkpoint_path is not None:
        ema = read_final(base.checkpoint_path, layout)[1]
        if ema is not None:
            sources["ema"] = ema
    if full is not None:
        sources["full_budget"] = read_final(full.checkpoint_path, layout)[0]
    if same is not None:
        sources["sgd_same_compute"] = read_final(same.checkpoint_path, layout)[0]
    sources["twa"] = twa.weights
    run = evaluate_parallel(cfg, sources, base.store_uri, os.getcwd(), keep_state=("twa",),
                            max_tasks=cfg.eval.workers)
    run.results.update({name: run.results[c] for name, c in aliases.items()})  # the same model: evaluated once
    initial = [i for i, info in infos.items() if info.get("kind") == INITIAL_KIND]
    return RunEvaluation(run, members, initial)


def write_run(cfg: Config, run_dir: Path, base, twa, full, evaluation: RunEvaluation, same=None) -> dict:
    """Stage 5: the run folder (summary.json, metrics, coefficients, model.pt, plots), then
    config.json, which with summary.json marks the run complete (both removed before the
    first file is written: ``runs.write_complete_run``). Returns the summary."""
    summary = twa_summary(cfg, base, twa, full, evaluation, same)
    summary["model_spec"] = model_spec(cfg, task_from_config(cfg))  # what twa_ray.load_model builds
    metrics = stage_rows("base_train", base.metrics) + stage_rows("twa", twa.history)
    if full is not None:
        metrics += stage_rows("full_budget", full.metrics)
    if same is not None:
        metrics += stage_rows("sgd_same_compute", same.metrics)
    test_curve = candidate_curve(base.store_uri, evaluation.results) if cfg.eval.candidates else None
    mixing = run_mixing(base.store_uri, cfg.twa, twa.coefficients, twa.rounds, twa.block_names)
    write_complete_run(cfg, run_dir, lambda: write_run_folder(
        run_dir, summary, metrics, mixing, evaluation.results["twa"].state_dict,
        lambda path: plot_accuracy(path, summary, metrics, test_curve)))
    return summary


def candidate_curve(store_uri: str, results: dict[str, Evaluated], prefix: str = "cand:") -> tuple[list, list]:
    """(epochs, test metric values) of the candidates evaluated under ``prefix``."""
    store = CandidateStore.open(store_uri)
    points = sorted(
        (float(c.info.get("epoch", c.index)), results[f"{prefix}{c.index}"].value)
        for c in store.list_candidates() if f"{prefix}{c.index}" in results
    )
    return [p[0] for p in points], [p[1] for p in points]


# ---------------------------------------------------------------- summary.json


def stage_time(wall_s: float, compute_s: float) -> dict:
    """{"startup", "compute"} seconds of a stage: compute inside its loops (earlier, resumed
    or reused attempts included), start-up the rest of the wall time it took in this run
    (worker group, data, store; 0 when the stage was reused)."""
    return {"startup": max(0.0, wall_s - compute_s), "compute": compute_s}


def _total(times: dict) -> float:
    return times["startup"] + times["compute"]


def cost_ratios(times: dict, continued: bool = True) -> tuple[float | None, float | None]:
    """(cost_ratio, wall_ratio): base training + TWA over the full budget, in compute
    seconds and in wall seconds (start-up included). The full budget costs base training
    plus its continuation (``continued``), or its own run alone when it trained from the start."""
    base, twa, full = times["base_train"], times["twa"], times.get("full_budget")
    if full is None:
        return None, None
    shared = base if continued else {"startup": 0.0, "compute": 0.0}
    cost = (base["compute"] + twa["compute"]) / (shared["compute"] + full["compute"])
    wall = (_total(base) + _total(twa)) / (_total(shared) + _total(full))
    return cost, wall


def epoch_cost_ratio(base_metrics: list[dict], twa_history: list[dict]) -> float | None:
    """A TWA epoch's compute per example over a base-training (SGD) epoch's: each side's mean
    measured epoch time (its monitoring evaluation included) over its epoch's examples, as the
    workers counted them (``train_examples`` of base training's epochs, ``examples`` of TWA's).
    None where a side lacks them (a store from an older version, reused)."""
    sgd = [m["time"] / m["train_examples"] for m in base_metrics if m.get("time") and m.get("train_examples")]
    twa = [h["epoch_time_s"] / h["examples"] for h in twa_history if h.get("epoch_time_s") and h.get("examples")]
    if not (sgd and twa):
        return None
    return (sum(twa) / len(twa)) / (sum(sgd) / len(sgd))


def twa_summary(cfg: Config, base, twa, full, evaluation: RunEvaluation, same=None) -> dict:
    """summary.json of the main job (README "What a run leaves behind" explains each key)."""
    results, members = evaluation.results, evaluation.members
    continued = full is not None and not any(m.get("epoch") == 1 for m in full.metrics)
    times = {
        "base_train": stage_time(base.wall_time_s, base.compute_s),
        "twa": stage_time(twa.wall_time_s, sum(h.get("epoch_time_s", 0.0) for h in twa.history)),
        "full_budget": None if full is None else stage_time(full.wall_time_s, full.compute_s),
        "sgd_same_compute": None if same is None else stage_time(same.wall_time_s, same.compute_s),
        "evaluation": stage_time(evaluation.run.wall_s, evaluation.run.compute_s),
    }
    cost, wall = cost_ratios(times, continued)
    methods = job_methods(MAIN)
    task = task_from_config(cfg)
    return {
        "config": cfg.name,
        **task_summary(cfg, task),
        "num_candidates": len(members["twa"]),
        "rounds": len(twa.rounds),
        "bits": cfg.twa.bits,
        "granularity": cfg.twa.granularity,
        "basis": cfg.twa.basis,
        "twa_data": cfg.twa.data,
        "workers": cfg.twa.workers,
        "base_epochs": cfg.train.epochs,
        "budget_epochs": cfg.train.schedule_epochs,
        "twa_epochs": cfg.twa.epochs,
        "epochs": {"base": cfg.train.epochs, "twa": twa_total_epochs(cfg, twa),
                   "full_budget": cfg.train.schedule_epochs if full is not None else None,
                   "sgd_same_compute": cfg.train.epochs + twa_total_epochs(cfg, twa) if same is not None else None},
        f"test_{task.metric}": {m.name: results[m.name].value if m.name in results else None for m in methods},
        "test_loss": {m.name: results[m.name].loss if m.name in results else None for m in methods},
        "trained_on": {m.name: m.trained_on(cfg) for m in methods},
        "selected_on": {m.name: m.selected_on for m in methods if m.selected_on},
        "swa_candidates": len(members["swa"]),
        "best_k_candidates": members["best_k"],
        "twa_includes_initial": any(i in members["twa"] for i in evaluation.initial),
        "ema_decay": cfg.baselines.ema_decay,
        "ema_warmup": cfg.baselines.ema_warmup,
        "time_s": times,
        "full_budget_continued": continued if full is not None else None,
        "cost_ratio": cost,
        "wall_ratio": wall,
        "twa_epoch_vs_sgd_epoch": epoch_cost_ratio(base.metrics, twa.history),
        "projection_bytes_per_worker": [int(b) for b in twa.projection_bytes],
        "store": base.store_uri,
    }
