"""Fine-tuned models for a soup (the soup job's first stage): pretrain once, then fine-tune
``finetune.num_models`` copies with varied settings.

Each model is a plain PyTorch loop in a one-shot Ray task (``runtime.tasks``) on one
CPU or one GPU, as many at a time as the cluster fits (``finetune.max_concurrent`` caps
it): a fine-tuned model needs one worker and no collectives, so a TorchTrainer and its
worker-group start-up per model would buy nothing. Checkpoints land in
``<run_dir>/finetuned`` as ``model_{i}.pt`` (Model Soups' naming, plain state_dicts) with
a ``model_{i}.json`` of its hyperparameters and metrics; a re-run skips the models
already there.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..config import Config, TrainConfig, config_to_dict, recorded_config, without_locations
from ..core.schedules import ScheduleSpec, make_optimizer, make_scheduler
from ..data.from_config import splits_from_config
from ..parallel.evaluate import evaluate
from ..tasks import ImageClassification  # making fine-tuned models is the built-in task's (soup_config_problems)
from ..runtime.tasks import run_task, task_device, task_slots
from ..models.from_config import model_from_config
from ..output.atomic import read_json, write_json, write_torch
from .runs import require_same_settings

log = logging.getLogger(__name__)

FINETUNE_SECTIONS = ("seed", "data", "model", "train", "finetune")  # what decides the fine-tuned models
PRETRAINED_FILE = "pretrained.pt"
FINETUNED_DIR = "finetuned"
SETTINGS_FILE = "settings.json"  # in FINETUNED_DIR: the settings its models were fine-tuned with


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
                        milestones=tc.milestones, gamma=tc.gamma, final_factor=tc.final_lr_factor,
                        swa_start=tc.swa_start, epochs=epochs)
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


def pretrain(cfg: Config, cwd: str | None, out: str) -> dict:
    """Train ``cfg.model`` from seed ``cfg.seed`` for ``finetune.pretrain_epochs`` on the
    classes ``finetune.pretrain_classes`` of the train split (``train.lr``, weight decay,
    label smoothing; ``data.augment``); writes the state_dict to ``out``."""
    ft, device = cfg.finetune, task_device()
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
    val = evaluate(model, splits.val, ImageClassification(), device, cfg.data.eval_batch_size)
    write_torch(out, {k: v.cpu() for k, v in model.state_dict().items()})
    log.info("pretrained on classes %s (%d images, %d epochs): val acc %.2f%% on all classes",
             classes, len(data), ft.pretrain_epochs, val.value)
    return {"history": history, "val_acc": val.value, "classes": classes, "images": len(data)}


def finetune(cfg: Config, cwd: str | None, init: str, spec: FinetuneSpec, out: str) -> dict:
    """Fine-tune the pretrained ``init`` on the whole train split with ``spec``'s settings for
    ``finetune.epochs``; writes ``out`` (a plain state_dict) and ``out`` with .json (metrics)."""
    device = task_device()
    splits = splits_from_config(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, augment=True)), cwd)
    model = model_from_config(cfg, splits)
    model.load_state_dict(torch.load(init, map_location="cpu", weights_only=True))
    data = splits.train if spec.augment else splits.train_eval  # same images, with or without augmentation
    started = time.perf_counter()
    history = train_plain(model, data, cfg.train, epochs=cfg.finetune.epochs, batch_size=cfg.data.batch_size,
                          lr=spec.lr, weight_decay=spec.weight_decay, label_smoothing=spec.label_smoothing,
                          seed=spec.seed, device=device)
    val = evaluate(model, splits.val, ImageClassification(), device, cfg.data.eval_batch_size)
    write_torch(out, {k: v.cpu() for k, v in model.state_dict().items()})
    result = {**dataclasses.asdict(spec), "file": Path(out).name, "train_loss": history[-1]["train_loss"],
              "train_acc": history[-1]["train_acc"], "val_acc": val.value, "time": time.perf_counter() - started}
    write_json(Path(out).with_suffix(".json"), result)  # last: marks the model as done
    log.info("fine-tuned model %d (lr %g, wd %g, augment %s, label smoothing %g): val acc %.2f%%",
             spec.index, spec.lr, spec.weight_decay, spec.augment, spec.label_smoothing, val.value)
    return result


def finetune_settings(cfg: Config) -> dict:
    """What decides the fine-tuned models (``FINETUNE_SECTIONS`` of ``cfg``), as recorded in
    ``<run_dir>/finetuned/settings.json``."""
    raw = config_to_dict(cfg)
    return {k: raw[k] for k in FINETUNE_SECTIONS}


def check_finetuned(cfg: Config, run_dir: str | Path) -> bool:
    """ConfigError naming the sections when ``<run_dir>/finetuned`` holds models fine-tuned with
    other settings (``runs.require_same_settings``; where the data was read from, data.root,
    aside: ``config.without_locations``); returns whether it recorded any. No Ray: the soup
    job calls it before Ray starts."""
    folder = Path(run_dir).resolve() / FINETUNED_DIR
    if not (folder / SETTINGS_FILE).exists():
        return False
    recorded = recorded_config(read_json(folder / SETTINGS_FILE))  # keys added since at their defaults
    require_same_settings(f"the folder of fine-tuned models {folder}", without_locations(recorded),
                          without_locations(finetune_settings(cfg)), FINETUNE_SECTIONS)
    return True


@dataclass
class FinetuneResult:
    """The fine-tuned checkpoints: ``folder`` holds ``model_{i}.pt`` (i = 0..N-1)."""

    folder: str
    pretrain: dict  # {history, val_acc, classes, images}
    models: list[dict]  # per model: its FinetuneSpec fields, file, train_loss, train_acc, val_acc, time
    time_s: dict = field(default_factory=dict)  # pretrain, finetune (wall seconds, this run)


def make_finetuned(cfg: Config, run_dir: str | Path) -> FinetuneResult:
    """Pretrain once, then fine-tune ``finetune.num_models`` copies as concurrent Ray tasks.

    Models already in ``<run_dir>/finetuned`` (same settings) are kept; a folder made
    with other settings is an error (``check_finetuned``).
    """
    import ray

    folder = Path(run_dir).resolve() / FINETUNED_DIR
    if not check_finetuned(cfg, run_dir):
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / SETTINGS_FILE, finetune_settings(cfg))
    cwd, times = os.getcwd(), {}

    pretrained = folder.parent / PRETRAINED_FILE
    pre_json = pretrained.with_suffix(".json")
    started = time.perf_counter()
    if pre_json.exists():
        pre = read_json(pre_json)
    else:
        pre = ray.get(run_task(pretrain, cfg, cwd, str(pretrained)))
        write_json(pre_json, pre)
    times["pretrain"] = time.perf_counter() - started

    started = time.perf_counter()
    specs = finetune_specs(cfg)
    done = {s.index: read_json(folder / f"model_{s.index}.json") for s in specs if (folder / f"model_{s.index}.json").exists()}
    todo = [s for s in specs if s.index not in done]
    if done:
        log.info("reusing %d fine-tuned models in %s", len(done), folder)
    limit, running = task_slots(cfg.finetune.max_concurrent), {}
    log.info("fine-tuning %d models, %d at a time", len(todo), limit)
    while todo or running:
        while todo and len(running) < limit:
            spec = todo.pop(0)
            running[run_task(finetune, cfg, cwd, str(pretrained), spec, str(folder / f"model_{spec.index}.pt"))] = spec
        ready, _ = ray.wait(list(running), num_returns=1)
        for ref in ready:
            done[running.pop(ref).index] = ray.get(ref)
    times["finetune"] = time.perf_counter() - started
    return FinetuneResult(str(folder), pre, [done[s.index] for s in specs], times)
