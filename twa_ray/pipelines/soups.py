"""The soup job's stages (jobs/soup_twa.py), one call each:

    fine-tuned models ──► candidate store ──► TWA-v (on the val split)
    (a folder, or made:      (import)     ──► soups selected on val: best individual,
     pipelines.finetune)                       uniform soup, greedy soup
                                          ──► test split: every model, soup and TWA ──► run folder

Held-out selection (best individual, greedy soup) uses the val split; the test split is
read once, by the final evaluation.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config, config_to_dict
from ..core.soups import Soup, individual_scores, weights_scorer
from ..data import calibration_loader
from ..parallel.evaluate import evaluate
from ..tasks import to_device
from ..runtime.evaluation import Evaluated, evaluate_on_ray
from ..runtime.ray_env import init_ray
from ..runtime.tasks import run_task, task_device, task_slots
from ..output.methods import SOUP, job_methods, method
from ..output.mixing import run_mixing
from ..output.plots import plot_soups
from ..output.run_folder import stage_rows, write_run_folder
from ..store import CandidateStore
from ..tasks import BUILTIN, model_spec, task_data, task_from_config, task_summary
from ..tune.ray_results import find_checkpoints, import_checkpoints  # any format, Ray Train / Tune folders too
from .finetune import FinetuneResult, check_finetuned, make_finetuned
from .runs import require_same_settings, write_complete_run

log = logging.getLogger(__name__)


def soup_methods() -> list[str]:
    """The soup job's methods (``output.methods``): its summary's test_acc keys, in order."""
    return [m.name for m in job_methods(SOUP)]


# ---------------------------------------------------------------- the stages


@dataclass
class SoupModels:
    """The fine-tuned models: ``folder`` of checkpoints, and how they were made (None: given)."""

    folder: str
    finetuned: FinetuneResult | None = None


def fine_tuned_models(cfg: Config, run_dir: str | Path, times: dict) -> SoupModels:
    """Stage 1: ``checkpoints_dir`` when set, else pretrain + fine-tune in Ray tasks
    (``pipelines.finetune``; Ray starts only then, so a bad folder fails before it)."""
    if cfg.checkpoints_dir is not None:
        if cfg.finetune is not None:
            log.info("checkpoints_dir is set: using %s, the finetune section is ignored", cfg.checkpoints_dir)
        return SoupModels(cfg.checkpoints_dir)
    init_ray()
    finetuned = make_finetuned(cfg, run_dir)
    times.update(finetuned.time_s)
    return SoupModels(finetuned.folder, finetuned)


def import_models(cfg: Config, models: SoupModels, times: dict) -> str:
    """Stage 2: the candidate store, one row per model (``import_candidates``); returns its URI."""
    started = time.perf_counter()
    store_uri = import_candidates(cfg, models.folder)
    times["import"] = time.perf_counter() - started
    return store_uri


def select_soups_and_train_twa(cfg: Config, store_uri: str, times: dict):
    """Stage 3: the soups selected on val (a Ray task) while TWA-v trains on Ray Train.
    Returns (``SoupSelection``, ``TWAResult``)."""
    init_ray()  # joins or starts Ray once
    import ray

    from ..runtime.twa_train import run_twa

    selecting = start_soup_selection(cfg, store_uri)
    twa = run_twa(cfg, store_uri)
    selection = ray.get(selecting)
    times.update(twa=twa.wall_time_s, twa_in_workers=twa.time_s, soups=selection.time_s)
    return selection, twa


def evaluate_all(cfg: Config, store_uri: str, selection: SoupSelection, twa, times: dict) -> dict[str, Evaluated]:
    """Stage 4: the test split scores every model, the soups and TWA (``evaluate_soups``)."""
    started = time.perf_counter()
    results = evaluate_soups(cfg, store_uri, selection, twa.weights)
    times["evaluate"] = time.perf_counter() - started
    return results


def write_run(cfg: Config, run_dir: str | Path, models: SoupModels, selection: SoupSelection, twa,
              results: dict[str, Evaluated], store_uri: str, times: dict) -> dict:
    """Stage 5: the run folder (``output.run_folder``, plus models/<method>.{pt,safetensors}),
    then config.json, which with summary.json marks the run complete (both removed before the
    first file is written: ``runs.write_complete_run``). Returns the summary."""
    finetuned = models.finetuned
    summary = soup_summary(cfg, finetuned, selection, twa, results, store_uri, times)
    summary["model_spec"] = model_spec(cfg, task_from_config(cfg))  # what twa_ray.load_model builds
    metrics = stage_rows("twa", twa.history) + stage_rows("soups", selection.soups["greedy_soup"].trace)
    if finetuned is not None:
        metrics = (stage_rows("pretrain", finetuned.pretrain["history"]) + stage_rows("finetune", finetuned.models)
                   + metrics)
    model_acc = [results[f"cand:{c}"].value for c in selection.indices]
    methods = soup_methods()
    mixing = run_mixing(store_uri, cfg.twa, twa.coefficients, twa.rounds, twa.block_names)
    write_complete_run(cfg, run_dir, lambda: write_run_folder(
        run_dir, summary, metrics, mixing, results["twa"].state_dict,
        lambda path: plot_soups(path, model_acc, {m: results[m].value for m in methods}, summary["metric"]),
        models={m: results[m].state_dict for m in methods},
    ))
    return summary


# ---------------------------------------------------------------- config


def soup_config_problems(cfg: Config) -> list[str]:
    """What keeps ``cfg`` from running the soup job, one line per problem (empty: fine)."""
    problems = []
    if cfg.checkpoints_dir is None and cfg.finetune is None:
        problems.append("checkpoints_dir / finetune: give a folder of fine-tuned checkpoints "
                        "(checkpoints_dir=PATH) or a finetune: section to make them")
    if cfg.data.val_ratio <= 0:
        problems.append("data.val_ratio: the soups select on the val split; it must be > 0")
    ft = cfg.finetune
    if cfg.checkpoints_dir is None and ft is not None:
        if cfg.task != BUILTIN:
            problems.append(f"finetune: makes fine-tuned models of task {BUILTIN!r} only; for task {cfg.task!r} "
                            "give checkpoints_dir (or twa-ray soup --from DIR: a folder, a Ray Tune experiment)")
        if ft.num_models < 2:
            problems.append(f"finetune.num_models: {ft.num_models} is not >= 2 (a soup needs two models)")
        if ft.epochs < 1 or ft.pretrain_epochs < 0:
            problems.append(f"finetune.epochs / pretrain_epochs: {ft.epochs} / {ft.pretrain_epochs} are not >= 1 / >= 0")
        for key in ("lrs", "weight_decays", "augment", "label_smoothing"):
            if not getattr(ft, key):
                problems.append(f"finetune.{key}: give at least one value")
        if any(v <= 0 for v in ft.lrs) or any(v < 0 for v in ft.weight_decays):
            problems.append(f"finetune.lrs / weight_decays: {ft.lrs} / {ft.weight_decays} must be > 0 / >= 0")
        if any(not 0 <= v < 1 for v in ft.label_smoothing):
            problems.append(f"finetune.label_smoothing: {ft.label_smoothing} must be in [0, 1)")
        if ft.pretrain_classes is not None and not ft.pretrain_classes:
            problems.append("finetune.pretrain_classes: give at least one class, or null for all")
        if ft.max_concurrent is not None and ft.max_concurrent < 1:
            problems.append(f"finetune.max_concurrent: {ft.max_concurrent} is not >= 1")
    return problems


# ---------------------------------------------------------------- import


def _signature(folder: str | Path) -> list[list]:
    """[entry, [[file, size, mtime_ns], ...]] of every checkpoint in ``folder``, with every file
    it is read from (a sharded model's shards, a DCP folder's files): tells a changed folder apart."""
    return [[c.entry, [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in c.all_files]]
            for c in find_checkpoints(folder)]


def check_imported(cfg: Config, folder: str | Path) -> CandidateStore | None:
    """The candidate store at ``cfg.store_uri`` when it holds exactly the checkpoints of
    ``folder`` (names, sizes, times) for ``cfg.model``; None when there is none yet;
    ConfigError naming what differs otherwise (``runs.require_same_settings``). No Ray."""
    try:
        store = CandidateStore.open(cfg.store_uri)
    except FileNotFoundError:
        return None
    signature = _signature(folder)
    recorded = {"checkpoints": store.meta.get("signature"), "checkpoint count": len(store),
                "model": store.meta.get("config", {}).get("model")}
    wanted = {"checkpoints": signature, "checkpoint count": len(signature), "model": config_to_dict(cfg)["model"]}
    require_same_settings(f"the candidate store {store.uri} (for the checkpoints in {folder})", recorded, wanted,
                          elsewhere="output_dir or store")
    return store


def check_reuse(cfg: Config, run_dir: str | Path) -> None:
    """Before Ray starts: ConfigError naming the keys when what the job would reuse from
    ``run_dir`` was made with other settings: the fine-tuned models (``finetune.check_finetuned``),
    or the store imported from ``checkpoints_dir`` (``check_imported``). TWA settings may
    change: TWA then trains afresh (``twa_train.twa_run_name``), as in the main job."""
    if cfg.checkpoints_dir is None:
        check_finetuned(cfg, run_dir)
    else:
        check_imported(cfg, cfg.checkpoints_dir)


def import_candidates(cfg: Config, folder: str | Path) -> str:
    """The candidate store (at ``cfg.store_uri``) holding the checkpoints of ``folder``.

    Imports them (see ``twa_ray.store.importers``) unless the store exists for exactly
    these files; a store with other content is an error (``check_imported``). Returns the
    store's URI.
    """
    store = check_imported(cfg, folder)
    if store is None:
        task = task_from_config(cfg)
        store = import_checkpoints(folder, cfg.store_uri, task.build_model(),
                                   meta={"config": config_to_dict(cfg), "signature": _signature(folder),
                                         "model_spec": model_spec(cfg, task)})
        return store.uri
    log.info("reusing the %d imported candidates in %s", len(store), store.uri)
    return store.uri


# ---------------------------------------------------------------- soups (held-out selection)


@dataclass
class SoupSelection:
    """The soups chosen on the val split. ``members`` of each soup are store indices."""

    indices: list[int]  # store indices of the models, in row order
    entries: list[str]  # their checkpoint names in the imported folder (e.g. model_3.pt)
    val_values: list[float]  # per model (BatchNorm recalibrated): the task's metric
    soups: dict[str, Soup]  # per soup method (``output.methods``)
    time_s: float = 0.0


def select_soups(cfg: Config, store_uri: str, cwd: str | None = None) -> SoupSelection:
    """Best individual, uniform and greedy soup of the store's models, by the task's val metric
    (image classification: accuracy) after BatchNorm recalibration on ``twa.bn_batches``
    shuffled batches of training data. Soups hold scores that are higher-is-better (the
    metric, negated when lower is better); ``val_values`` the metric itself."""
    started, device = time.perf_counter(), task_device()
    task = task_from_config(cfg, "eval", cwd)
    data = task_data(task)
    model = task.build_model().to(device)
    store = CandidateStore.open(store_uri)
    infos = store.list_candidates()
    indices = [c.index for c in infos]
    candidates = store.read(candidates=indices)  # (n, D)
    bn_data = calibration_loader(data.train_eval, cfg.data.eval_batch_size, cfg.twa.bn_batches, cfg.seed,
                                 data.collate_fn)
    score = weights_scorer(model, lambda m: evaluate(m, data.val, task, device, cfg.data.eval_batch_size,
                                                     collate_fn=data.collate_fn).score, bn_data,
                           forward=lambda m, batch: task.evaluate(m, to_device(batch, device)))
    scores = individual_scores(candidates, score)
    soups = {m.name: m.soup(candidates, score, scores) for m in job_methods(SOUP) if m.soup is not None}
    for soup in soups.values():  # rows -> store indices
        soup.members = [indices[r] for r in soup.members]
        soup.trace = [{**t, "candidate": indices[t["candidate"]]} for t in soup.trace]
    sign = 1.0 if task.higher_is_better else -1.0
    chosen = [f"{method(name).label} {sign * soup.score:.4g}" + (f" (members {soup.members})" if soup.trace else "")
              for name, soup in soups.items()]  # a selection that tried models one by one: its pick
    log.info("val %s: models %s; %s", task.metric, [round(sign * s, 4) for s in scores], ", ".join(chosen))
    entries = [str(c.info.get("entry", c.index)) for c in infos]
    return SoupSelection(indices, entries, [sign * s for s in scores], soups, time.perf_counter() - started)


def start_soup_selection(cfg: Config, store_uri: str):
    """``select_soups`` as a Ray task (an ObjectRef): it can run while TWA trains."""
    return run_task(select_soups, cfg, store_uri, os.getcwd())


def evaluate_soups(cfg: Config, store_uri: str, selection: SoupSelection, twa_weights: torch.Tensor) -> dict[str, Evaluated]:
    """Test accuracy of every model ("cand:<index>"), the three soups and TWA (with their
    recalibrated state_dicts), in concurrent Ray tasks (one per CPU, at most four).

    A soup of one model (the best individual, often the greedy soup) is that model:
    it is evaluated once, under both names.
    """
    from concurrent.futures import ThreadPoolExecutor

    sources: dict = {f"cand:{i}": i for i in selection.indices}
    aliases = {}
    for name, soup in selection.soups.items():
        if len(soup.members) == 1:
            aliases[name] = f"cand:{soup.members[0]}"
        else:
            sources[name] = soup.weights
    sources["twa"] = twa_weights
    keep = tuple(soup_methods()) + tuple(aliases.values())
    names = list(sources)
    parts = max(1, min(4, task_slots(cfg.finetune.max_concurrent if cfg.finetune else None), len(names)))
    chunks = [{n: sources[n] for n in names[k::parts]} for k in range(parts)]
    with ThreadPoolExecutor(parts) as pool:
        done = pool.map(lambda chunk: evaluate_on_ray(cfg, chunk, store_uri, os.getcwd(), keep_state=keep), chunks)
        results = {k: v for part in done for k, v in part.items()}
    results.update({name: results[target] for name, target in aliases.items()})
    return results


# ---------------------------------------------------------------- summary


def soup_summary(cfg: Config, finetuned: FinetuneResult | None, selection: SoupSelection, twa,
                 results: dict[str, Evaluated], store_uri: str, time_s: dict) -> dict:
    """summary.json of the soup job: test accuracies (percent) of its methods (``soup_methods``), and how
    they came about."""
    soups, methods = selection.soups, soup_methods()
    task = task_from_config(cfg)
    metric, sign = task.metric, (1.0 if task.higher_is_better else -1.0)
    return {
        "config": cfg.name,
        **task_summary(cfg, task),
        "source": "checkpoints_dir" if finetuned is None else "finetune",
        "checkpoints_dir": cfg.checkpoints_dir if finetuned is None else finetuned.folder,
        "num_models": len(selection.indices),
        "bits": cfg.twa.bits,
        "granularity": cfg.twa.granularity,
        "basis": cfg.twa.basis,
        "twa_data": cfg.twa.data,
        "twa_epochs": cfg.twa.epochs,
        "workers": cfg.twa.workers,
        f"test_{metric}": {m: results[m].value for m in methods},
        "test_loss": {m: results[m].loss for m in methods},
        f"val_{metric}": {name: sign * soup.score for name, soup in soups.items()},
        "best_individual": soups["best_individual"].members[0],
        "greedy_soup_members": soups["greedy_soup"].members,
        "models": _model_rows(finetuned, selection, results, metric),
        "time_s": time_s,
        "projection_bytes_per_worker": [int(b) for b in twa.projection_bytes],
        "store": store_uri,
    }


def _model_rows(finetuned: FinetuneResult | None, selection: SoupSelection, results: dict[str, Evaluated],
                metric: str) -> list[dict]:
    """Per model: candidate index, checkpoint name, val and test metric (and its fine-tuning settings)."""
    made = {m["file"]: m for m in finetuned.models} if finetuned is not None else {}
    keys = ("lr", "weight_decay", "augment", "label_smoothing", "seed")
    return [
        {"candidate": c, "entry": e, f"val_{metric}": v, f"test_{metric}": results[f"cand:{c}"].value,
         **{k: made[e][k] for k in keys if e in made}}
        for c, e, v in zip(selection.indices, selection.entries, selection.val_values)
    ]
