"""The stages of the soup job (jobs/soup_twa.py), as library calls.

    fine-tuned checkpoints ──► candidate store ──► TWA-v (run_twa, on the val split)
    (a folder, or made here:      (import)      ──► soups selected on val: best individual,
     pretrain once, fine-tune                        uniform soup, greedy soup
     N copies on Ray)                           ──► test split: every model, soup and TWA

Fine-tuning runs as Ray tasks, each a plain PyTorch loop on one CPU (or one GPU), as many
at a time as the cluster fits (``finetune.max_concurrent`` caps it). One TorchTrainer per
model would cost 12-25 s of start-up each on a small machine for no gain: a fine-tuned
model needs one worker and no collectives. Checkpoints land in ``<run_dir>/finetuned``
as ``model_{i}.pt`` (Model Soups' naming, plain state_dicts) with a ``model_{i}.json``
of its hyperparameters and metrics; a re-run skips the models already there.

Held-out selection (best individual, greedy soup) uses the val split; the test split is
read once, by the final evaluation.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .builders import model_from_config, splits_from_config
from .config import Config, TrainConfig, config_from_dict, config_to_dict
from .data import calibration_loader
from .core import ScheduleSpec, Soup, best_individual, greedy_soup, individual_scores, make_optimizer
from .core import make_scheduler, uniform_soup, weights_scorer
from .distributed.evaluate import Evaluated, evaluate_on_ray
from .evaluation import evaluate
from .plots import plot_coefficients
from .run_folder import atomic_path, write_json, write_rows, write_torch
from .run_report import coefficient_rows
from .store import CandidateStore, export_state_dict, find_checkpoints, import_checkpoints

log = logging.getLogger(__name__)

METHODS = ("best_individual", "uniform_soup", "greedy_soup", "twa")
FINETUNE_SECTIONS = ("seed", "data", "model", "train", "finetune")  # what decides the fine-tuned models
PRETRAINED_FILE = "pretrained.pt"
FINETUNED_DIR = "finetuned"


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


# ---------------------------------------------------------------- fine-tuning (Ray tasks)


@dataclass(frozen=True)
class FinetuneSpec:
    """The hyperparameters of fine-tuned model ``index``."""

    index: int
    lr: float
    weight_decay: float
    augment: bool
    label_smoothing: float
    seed: int


def finetune_specs(cfg: Config) -> list[FinetuneSpec]:
    """``finetune.num_models`` settings: the grid lrs x weight_decays x augment x
    label_smoothing in a seeded random order (repeated if needed), one seed per model."""
    ft = cfg.finetune
    grid = list(itertools.product(ft.lrs, ft.weight_decays, ft.augment, ft.label_smoothing))
    random.Random(cfg.seed).shuffle(grid)
    return [FinetuneSpec(k, *grid[k % len(grid)], seed=cfg.seed + 1 + k) for k in range(ft.num_models)]


def class_subset(data: Subset, classes: Sequence[int]) -> Subset:
    """The examples of ``data`` (a Subset) whose label is in ``classes``."""
    base, indices = data.dataset, list(data.indices)
    targets = getattr(base, "targets", None)
    labels = torch.as_tensor(targets)[indices].tolist() if targets is not None else [data[i][1] for i in range(len(data))]
    wanted = set(classes)
    return Subset(base, [i for i, y in zip(indices, labels) if y in wanted])


def train_plain(
    model: nn.Module, data: Dataset, tc: TrainConfig, *, epochs: int, batch_size: int, lr: float,
    weight_decay: float, label_smoothing: float, seed: int, device: torch.device,
) -> list[dict]:
    """A plain PyTorch training loop: ``train.optimizer`` / ``train.schedule`` (over all
    ``epochs``) with the given lr, weight decay and label smoothing. Returns per epoch
    {epoch, train_loss, train_acc, lr, time}."""
    torch.manual_seed(seed)  # augmentation draws
    drop_last = 0 < len(data) % batch_size < 2  # BatchNorm needs two examples per batch
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=drop_last,
                        generator=torch.Generator().manual_seed(seed))
    spec = ScheduleSpec(kind=tc.schedule, total_steps=max(1, epochs * len(loader)), warmup_frac=tc.warmup,
                        milestones=list(tc.milestones), gamma=tc.gamma, final_factor=tc.final_lr_factor,
                        swa_start=tc.swa_start)
    optimizer = make_optimizer(model.parameters(), tc.optimizer, lr, tc.momentum, weight_decay, tc.nesterov)
    scheduler = make_scheduler(optimizer, spec)
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    model.to(device).train()
    history = []
    for epoch in range(1, epochs + 1):
        started, loss_sum, correct, count = time.perf_counter(), 0.0, 0, 0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            out = model(x)  # (B, num_classes)
            loss = criterion(out, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            scheduler.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((out.argmax(1) == y).sum())
            count += len(y)
        history.append({"epoch": epoch, "train_loss": loss_sum / max(1, count), "train_acc": 100.0 * correct / max(1, count),
                        "lr": optimizer.param_groups[0]["lr"], "time": time.perf_counter() - started})
    return history


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pretrain(cfg: Config, cwd: str | None, out: str) -> dict:
    """Train ``cfg.model`` from seed ``cfg.seed`` for ``finetune.pretrain_epochs`` on the
    classes ``finetune.pretrain_classes`` of the train split (``train.lr``, weight decay,
    label smoothing; ``data.augment``); writes the state_dict to ``out``."""
    ft, device = cfg.finetune, _device()
    splits = splits_from_config(cfg, cwd)
    classes = ft.pretrain_classes or list(range(splits.num_classes))
    bad = [c for c in classes if not 0 <= c < splits.num_classes]
    if bad:
        raise ValueError(f"finetune.pretrain_classes: {bad} are not classes of {cfg.data.name} (0..{splits.num_classes - 1})")
    torch.manual_seed(cfg.seed)
    model = model_from_config(cfg, splits)
    data = splits.train if ft.pretrain_classes is None else class_subset(splits.train, classes)
    history = train_plain(model, data, cfg.train, epochs=ft.pretrain_epochs, batch_size=cfg.data.batch_size,
                          lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                          label_smoothing=cfg.train.label_smoothing, seed=cfg.seed, device=device)
    val = evaluate(model, splits.val, device, cfg.data.eval_batch_size)
    write_torch(out, {k: v.cpu() for k, v in model.state_dict().items()})
    log.info("pretrained on classes %s (%d images, %d epochs): val acc %.2f%% on all classes",
             classes, len(data), ft.pretrain_epochs, val.accuracy)
    return {"history": history, "val_acc": val.accuracy, "classes": classes, "images": len(data)}


def finetune(cfg: Config, cwd: str | None, init: str, spec: FinetuneSpec, out: str) -> dict:
    """Fine-tune the pretrained ``init`` on the whole train split with ``spec``'s settings for
    ``finetune.epochs``; writes ``out`` (a plain state_dict) and ``out`` with .json (metrics)."""
    device = _device()
    splits = splits_from_config(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, augment=True)), cwd)
    model = model_from_config(cfg, splits)
    model.load_state_dict(torch.load(init, map_location="cpu", weights_only=True))
    data = splits.train if spec.augment else splits.train_eval  # same images, with or without augmentation
    started = time.perf_counter()
    history = train_plain(model, data, cfg.train, epochs=cfg.finetune.epochs, batch_size=cfg.data.batch_size,
                          lr=spec.lr, weight_decay=spec.weight_decay, label_smoothing=spec.label_smoothing,
                          seed=spec.seed, device=device)
    val = evaluate(model, splits.val, device, cfg.data.eval_batch_size)
    write_torch(out, {k: v.cpu() for k, v in model.state_dict().items()})
    result = {**dataclasses.asdict(spec), "file": Path(out).name, "train_loss": history[-1]["train_loss"],
              "train_acc": history[-1]["train_acc"], "val_acc": val.accuracy, "time": time.perf_counter() - started}
    write_json(Path(out).with_suffix(".json"), result)  # last: marks the model as done
    log.info("fine-tuned model %d (lr %g, wd %g, augment %s, label smoothing %g): val acc %.2f%%",
             spec.index, spec.lr, spec.weight_decay, spec.augment, spec.label_smoothing, val.accuracy)
    return result


def _run_task(fn: Callable, cfg: Config, *args: Any) -> Any:
    """A Ray task (an ObjectRef) calling ``fn(cfg, *args)`` on one CPU with one torch thread,
    or on one GPU when the cluster has them. (Two threads on a busy 2-core machine ran a
    small CNN 10x slower than one: one task per core is the way to use the cores.)"""
    import ray

    from .ray_env import cluster_has_gpus, worker_runtime_env

    def task(cfg_dict: dict, *task_args: Any) -> Any:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        torch.set_num_threads(1)
        return fn(config_from_dict(cfg_dict), *task_args)

    resources = {"num_gpus": 1} if cluster_has_gpus() else {"num_cpus": 1}
    return ray.remote(**resources, runtime_env=worker_runtime_env() or None)(task).remote(config_to_dict(cfg), *args)


def _max_concurrent(cfg: Config) -> int:
    """Tasks of one CPU (or GPU) the cluster runs at a time, capped by ``finetune.max_concurrent``."""
    import ray

    from .ray_env import cluster_cpus, cluster_has_gpus

    fit = ray.cluster_resources().get("GPU", 0) if cluster_has_gpus() else cluster_cpus()
    cap = cfg.finetune.max_concurrent if cfg.finetune is not None and cfg.finetune.max_concurrent else fit
    return max(1, int(min(cap, fit)))


@dataclass
class FinetuneResult:
    """The fine-tuned checkpoints: ``folder`` holds ``model_{i}.pt`` (i = 0..N-1)."""

    folder: str
    pretrain: dict  # {history, val_acc, classes, images}
    models: list[dict]  # per model: its FinetuneSpec fields, file, train_loss, train_acc, val_acc, time
    time_s: dict = field(default_factory=dict)  # pretrain, finetune (wall seconds, this run)


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def _settings(cfg: Config) -> dict:
    raw = config_to_dict(cfg)
    return {k: raw[k] for k in FINETUNE_SECTIONS}


def make_finetuned(cfg: Config, run_dir: str | Path) -> FinetuneResult:
    """Pretrain once, then fine-tune ``finetune.num_models`` copies as concurrent Ray tasks.

    Models already in ``<run_dir>/finetuned`` (same settings) are kept; a folder made
    with other settings is an error (run with --force, or use another output_dir).
    """
    import ray

    folder = Path(run_dir).resolve() / FINETUNED_DIR
    folder.mkdir(parents=True, exist_ok=True)
    settings_path = folder / "settings.json"
    settings = _settings(cfg)
    if settings_path.exists():
        if json.loads(settings_path.read_text()) != json.loads(json.dumps(settings)):
            raise ValueError(f"{folder} holds models fine-tuned with other settings: run with --force to start afresh, "
                             "or choose another output_dir")
    else:
        write_json(settings_path, settings)
    cwd, times = os.getcwd(), {}

    pretrained = folder.parent / PRETRAINED_FILE
    pre_json = pretrained.with_suffix(".json")
    started = time.perf_counter()
    if pre_json.exists():
        pre = read_json(pre_json)
    else:
        pre = ray.get(_run_task(pretrain, cfg, cwd, str(pretrained)))
        write_json(pre_json, pre)
    times["pretrain"] = time.perf_counter() - started

    started = time.perf_counter()
    specs = finetune_specs(cfg)
    done = {s.index: read_json(folder / f"model_{s.index}.json") for s in specs if (folder / f"model_{s.index}.json").exists()}
    todo = [s for s in specs if s.index not in done]
    if done:
        log.info("reusing %d fine-tuned models in %s", len(done), folder)
    limit, running = _max_concurrent(cfg), {}
    log.info("fine-tuning %d models, %d at a time", len(todo), limit)
    while todo or running:
        while todo and len(running) < limit:
            spec = todo.pop(0)
            running[_run_task(finetune, cfg, cwd, str(pretrained), spec, str(folder / f"model_{spec.index}.pt"))] = spec
        ready, _ = ray.wait(list(running), num_returns=1)
        for ref in ready:
            done[running.pop(ref).index] = ray.get(ref)
    times["finetune"] = time.perf_counter() - started
    return FinetuneResult(str(folder), pre, [done[s.index] for s in specs], times)


# ---------------------------------------------------------------- import


def _signature(folder: str | Path) -> list[list]:
    """[entry, size, mtime_ns] of every checkpoint in ``folder``: tells a changed folder apart."""
    return [[c.entry, c.path.stat().st_size, c.path.stat().st_mtime_ns] for c in find_checkpoints(folder)]


def import_candidates(cfg: Config, folder: str | Path) -> str:
    """The candidate store (at ``cfg.store_uri``) holding the checkpoints of ``folder``.

    Imports them (see ``twa_ray.store.importers``) unless the store exists for exactly
    these files; a store with other content is an error. Returns the store's URI.
    """
    uri = cfg.store_uri if "://" in cfg.store_uri else os.path.abspath(cfg.store_uri)
    signature = _signature(folder)
    try:
        store = CandidateStore.open(uri)
    except FileNotFoundError:
        splits = splits_from_config(cfg)
        store = import_checkpoints(folder, uri, model_from_config(cfg, splits),
                                   meta={"config": config_to_dict(cfg), "signature": signature,
                                         "num_classes": splits.num_classes})
        return store.uri
    same_model = store.meta.get("config", {}).get("model") == config_to_dict(cfg)["model"]
    if store.meta.get("signature") != signature or len(store) != len(signature) or not same_model:
        raise ValueError(f"the candidate store {uri} holds other checkpoints than {folder} (or another model): "
                         "run with --force to start afresh, or choose another output_dir or store")
    log.info("reusing the %d imported candidates in %s", len(store), uri)
    return store.uri


# ---------------------------------------------------------------- soups (held-out selection)


@dataclass
class SoupSelection:
    """The soups chosen on the val split. ``members`` of each soup are store indices."""

    indices: list[int]  # store indices of the models, in row order
    entries: list[str]  # their checkpoint names in the imported folder (e.g. model_3.pt)
    val_acc: list[float]  # per model (BatchNorm recalibrated), percent
    soups: dict[str, Soup]  # best_individual, uniform_soup, greedy_soup
    time_s: float = 0.0


def select_soups(cfg: Config, store_uri: str, cwd: str | None = None) -> SoupSelection:
    """Best individual, uniform and greedy soup of the store's models, by val accuracy
    after BatchNorm recalibration on ``twa.bn_batches`` shuffled batches of training data."""
    started, device = time.perf_counter(), _device()
    splits = splits_from_config(cfg, cwd)
    model = model_from_config(cfg, splits).to(device)
    store = CandidateStore.open(store_uri)
    infos = store.list_candidates()
    indices = [c.index for c in infos]
    candidates = store.read(candidates=indices)  # (n, D)
    bn_data = calibration_loader(splits.train_eval, cfg.data.eval_batch_size, cfg.twa.bn_batches, cfg.seed)
    score = weights_scorer(model, lambda m: evaluate(m, splits.val, device, cfg.data.eval_batch_size).accuracy, bn_data)
    scores = individual_scores(candidates, score)
    soups = {
        "best_individual": best_individual(candidates, scores=scores),
        "uniform_soup": uniform_soup(candidates, score),
        "greedy_soup": greedy_soup(candidates, score, scores=scores),
    }
    for soup in soups.values():  # rows -> store indices
        soup.members = [indices[r] for r in soup.members]
        soup.trace = [{**t, "candidate": indices[t["candidate"]]} for t in soup.trace]
    log.info("val accuracy: models %s; best individual %.2f%%, uniform soup %.2f%%, greedy soup %.2f%% (members %s)",
             [round(s, 2) for s in scores], soups["best_individual"].score, soups["uniform_soup"].score,
             soups["greedy_soup"].score, soups["greedy_soup"].members)
    entries = [str(c.info.get("entry", c.index)) for c in infos]
    return SoupSelection(indices, entries, scores, soups, time.perf_counter() - started)


def start_soup_selection(cfg: Config, store_uri: str):
    """``select_soups`` as a Ray task (an ObjectRef): it can run while TWA trains."""
    return _run_task(select_soups, cfg, store_uri, os.getcwd())


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
    keep = tuple(METHODS) + tuple(aliases.values())
    names = list(sources)
    parts = max(1, min(4, _max_concurrent(cfg), len(names)))
    chunks = [{n: sources[n] for n in names[k::parts]} for k in range(parts)]
    with ThreadPoolExecutor(parts) as pool:
        done = pool.map(lambda chunk: evaluate_on_ray(cfg, chunk, store_uri, os.getcwd(), keep_state=keep), chunks)
        results = {k: v for part in done for k, v in part.items()}
    results.update({name: results[target] for name, target in aliases.items()})
    return results


# ---------------------------------------------------------------- summary and run folder


def soup_summary(cfg: Config, finetuned: FinetuneResult | None, selection: SoupSelection, twa,
                 results: dict[str, Evaluated], store_uri: str, time_s: dict) -> dict:
    """summary.json of the soup job: test accuracies (percent) of the four methods, and how they came about."""
    soups = selection.soups
    return {
        "config": cfg.name,
        "dataset": cfg.data.name,
        "model": cfg.model.name,
        "source": "checkpoints_dir" if finetuned is None else "finetune",
        "checkpoints_dir": cfg.checkpoints_dir if finetuned is None else finetuned.folder,
        "num_models": len(selection.indices),
        "bits": cfg.twa.bits,
        "granularity": cfg.twa.granularity,
        "basis": cfg.twa.basis,
        "twa_data": cfg.twa.data,
        "twa_epochs": cfg.twa.epochs,
        "workers": cfg.twa.workers,
        "test_acc": {m: results[m].accuracy for m in METHODS},
        "test_loss": {m: results[m].loss for m in METHODS},
        "val_acc": {m: soups[m].score for m in ("best_individual", "uniform_soup", "greedy_soup")},
        "best_individual": soups["best_individual"].members[0],
        "greedy_soup_members": soups["greedy_soup"].members,
        "models": _model_rows(finetuned, selection, results),
        "time_s": time_s,
        "projection_bytes_per_worker": [int(b) for b in twa.projection_bytes],
        "store": store_uri,
    }


def _model_rows(finetuned: FinetuneResult | None, selection: SoupSelection, results: dict[str, Evaluated]) -> list[dict]:
    """Per model: candidate index, checkpoint name, val and test accuracy (and its fine-tuning settings)."""
    made = {m["file"]: m for m in finetuned.models} if finetuned is not None else {}
    keys = ("lr", "weight_decay", "augment", "label_smoothing", "seed")
    return [
        {"candidate": c, "entry": e, "val_acc": v, "test_acc": results[f"cand:{c}"].accuracy,
         **{k: made[e][k] for k in keys if e in made}}
        for c, e, v in zip(selection.indices, selection.entries, selection.val_acc)
    ]


def plot_soups(path: str | Path, model_acc: Sequence[float], marks: dict[str, float]) -> None:
    """Test accuracy of each fine-tuned model (bars) with the soups and TWA as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    ax.bar(range(len(model_acc)), model_acc, color="tab:gray", alpha=0.6, label="fine-tuned models")
    styles = {"best_individual": ("tab:blue", ":"), "uniform_soup": ("tab:orange", "--"),
              "greedy_soup": ("tab:red", "-."), "twa": ("tab:green", "-")}
    for name, acc in marks.items():
        color, style = styles.get(name, ("black", ":"))
        ax.axhline(acc, color=color, linestyle=style, label=f"{name.replace('_', ' ')} {acc:.2f}%")
    low = min(list(model_acc) + list(marks.values()))
    ax.set_ylim(max(0.0, low - 5.0), min(100.0, max(list(model_acc) + list(marks.values())) + 2.0))
    ax.set_xlabel("fine-tuned model")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3, fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_soup_run_folder(run_dir: str | Path, summary: dict, metrics: Sequence[dict], twa,
                          results: dict[str, Evaluated], selection: SoupSelection) -> list[Path]:
    """The run folder (each file atomic): model.pt (TWA), models/<method>.{pt,safetensors},
    metrics.parquet, coefficients.parquet, plots/accuracy.png, plots/coefficients.png,
    and summary.json last (its presence marks a complete run)."""
    run_dir = Path(run_dir)
    written = [run_dir / "model.pt", run_dir / "metrics.parquet", run_dir / "coefficients.parquet",
               run_dir / "plots" / "accuracy.png", run_dir / "plots" / "coefficients.png"]
    write_torch(written[0], results["twa"].state_dict)
    write_rows(written[1], metrics)
    write_rows(written[2], coefficient_rows(twa.coefficients, twa.rounds, twa.block_names))
    plot_soups(written[3], [results[f"cand:{c}"].accuracy for c in selection.indices],
               {m: results[m].accuracy for m in METHODS})
    last = len(twa.coefficients) - 1
    plot_coefficients(written[4], twa.coefficients[last], [f"model {c}" for c in twa.rounds[last]], twa.block_names)
    for method in METHODS:
        written += [Path(p) for p in export_state_dict(results[method].state_dict, run_dir / "models" / method)]
    write_json(run_dir / "summary.json", summary)
    return written + [run_dir / "summary.json"]


__all__ = [
    "FinetuneResult", "FinetuneSpec", "METHODS", "SoupSelection", "class_subset", "evaluate_soups", "finetune",
    "finetune_specs", "import_candidates", "make_finetuned", "plot_soups", "pretrain", "read_json",
    "select_soups", "soup_config_problems", "soup_summary", "start_soup_selection", "train_plain",
    "write_soup_run_folder",
]
