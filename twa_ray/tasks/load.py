"""Config -> task: the built-in ``image_classification`` or ``package.module:Class`` (built
as ``Class(**task_args)``), checked against the protocol in the driver, before any worker."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any, Callable

from ..config import Config, ConfigError
from ..data.sealed import SealedSplit, record_test_read
from .image_classification import ImageClassification
from .protocol import Task, TaskData, missing_members

BUILTIN = "image_classification"
STAGES = ("train", "twa", "eval")


class TaskError(ConfigError):
    """``task`` names nothing importable, or something that is no task (a config error: the
    jobs report it, naming the key, before their run folder or Ray starts)."""


def _stage_smoothing(cfg: Config, stage: str) -> float:
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: one of {', '.join(STAGES)}")
    return {"train": cfg.train.label_smoothing, "twa": cfg.twa.label_smoothing, "eval": 0.0}[stage]


def import_task_class(path: str, key: str = "task") -> Callable[..., Any]:
    """The object ``path`` (``package.module:Name``) names. The working directory is
    searched too (``twa-ray run`` from the folder that holds the module; a Ray job's
    working_dir). Raises TaskError naming ``key`` and ``path``."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise TaskError(f"{key}: {path!r} is no import path: write package.module:Name (or {BUILTIN!r})")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise TaskError(f"{key}: cannot import module {module_name!r} of {path!r} from {cwd}: {e}") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise TaskError(f"{key}: module {module_name!r} has no {attr!r} (from {path!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TaskError(f"{key}: {path!r} is not a class or function that makes a task")
    return obj


def task_from_config(cfg: Config, stage: str = "eval", root_base: str | Path | None = None) -> Task:
    """The task ``cfg.task`` names, for ``stage`` ("train", "twa" or "eval": the built-in
    task's label smoothing is the stage's). Raises TaskError naming the key and the path."""
    smoothing = _stage_smoothing(cfg, stage)
    if cfg.task == BUILTIN:
        if cfg.task_args:
            raise TaskError(f"task_args: {sorted(cfg.task_args)} given, but task {BUILTIN!r} takes none "
                            "(it is configured by data: and model:)")
        return ImageClassification(cfg, root_base, label_smoothing=smoothing)
    factory = import_task_class(cfg.task)
    try:
        task = factory(**dict(cfg.task_args))
    except TypeError as e:
        raise TaskError(f"task: {cfg.task!r} with task_args {dict(cfg.task_args)!r}: {e}") from e
    missing = missing_members(task)
    if missing:
        raise TaskError(f"task: {cfg.task!r} makes a {type(task).__name__}, which is no task: it lacks "
                        f"{', '.join(missing)} (see twa_ray.tasks.Task)")
    return task


def check_task(cfg: Config) -> Task:
    """The driver's check: the task imports, builds and satisfies the protocol, and the
    built-in task's own options are not set for another task. Raises TaskError."""
    if cfg.task != BUILTIN:
        for key, value in (("train.label_smoothing", cfg.train.label_smoothing),
                           ("twa.label_smoothing", cfg.twa.label_smoothing)):
            if value:
                raise TaskError(f"{key}={value} applies to task {BUILTIN!r} only; task {cfg.task!r} has its own loss")
    return task_from_config(cfg)


def task_data(task: Task, include_test: bool = False, reason: str = "evaluation") -> TaskData:
    """``task.datasets()`` with the test split sealed unless ``include_test`` (then the read
    is recorded, ``data.sealed``), and ``train_eval`` defaulting to ``train``."""
    data = task.datasets()
    if not isinstance(data, TaskData):
        raise TaskError(f"{type(task).__name__}.datasets() returned a {type(data).__name__}, not a twa_ray.tasks.TaskData")
    test = data.test
    if include_test:
        record_test_read(reason)
    else:
        test = SealedSplit(len(data.test))
    train_eval = data.train_eval if data.train_eval is not None else data.train
    return TaskData(data.train, data.val, test, train_eval, data.collate_fn)


def model_spec(cfg: Config, task: Task) -> dict:
    """What ``output.export.load_model`` rebuilds the model from (JSON-able): the built-in
    task's network spec, or the task's import path and arguments."""
    if isinstance(task, ImageClassification):
        return {"task": BUILTIN, **task.spec()}
    return {"task": cfg.task, "task_args": dict(cfg.task_args)}


def task_summary(cfg: Config, task: Task) -> dict:
    """The summary.json keys that name the task and its metric: task, metric,
    higher_is_better, dataset and model (the built-in task's ``data.name`` and
    ``model.name``; another task's import path for both)."""
    builtin = isinstance(task, ImageClassification)
    return {"task": cfg.task, "metric": task.metric, "higher_is_better": task.higher_is_better,
            "dataset": cfg.data.name if builtin else cfg.task, "model": cfg.model.name if builtin else cfg.task}


def model_from_spec(spec: dict, where: str = "model_spec") -> "torch.nn.Module":
    """The model a ``model_spec`` describes: the built-in task's network, or the model of the
    task ``spec["task"]`` built with ``spec["task_args"]`` (imported from the working
    directory too). Raises TaskError / ValueError naming ``where``."""
    from ..models.from_config import model_from_spec as network_from_spec

    name = spec.get("task", BUILTIN)
    if name == BUILTIN:
        return network_from_spec(spec)
    task = import_task_class(name, f"{where}.task")(**dict(spec.get("task_args") or {}))
    missing = missing_members(task)
    if missing:
        raise TaskError(f"{where}.task: {name!r} makes no task: it lacks {', '.join(missing)}")
    return task.build_model()
