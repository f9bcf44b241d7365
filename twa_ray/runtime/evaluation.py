"""The test-split evaluation of weight vectors (candidates, SWA, EMA, TWA, soups) in Ray tasks.

Each vector is loaded into the config task's model, BatchNorm (where the model has it) is
recalibrated on ``twa.bn_batches`` shuffled, seeded batches of the training data
(``train_eval``: train indices, eval transform; ``data.calibration_loader``), and the model
is evaluated on the test split with the task's metrics (``parallel.evaluate.evaluate``). Every model gets the same recalibration
batches and ``update_bn`` resets the statistics first, so a model's result does not depend
on which task evaluates it or after which other model: :func:`evaluate_parallel` spreads
the models over tasks with results identical to one task. A task asks for a GPU when the
cluster has one.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Union

import torch

from ..config import Config
from ..core.baselines import streaming_mean
from ..core.params import assign_flat
from ..data import calibration_loader
from ..output.console import Progress
from ..parallel.evaluate import evaluate
from ..store import CandidateStore
from ..tasks import recalibrate_bn_by_task, task_data, task_from_config
from .tasks import run_task, task_device, task_slots

log = logging.getLogger(__name__)


# A source of weights: a store candidate index, the SWA of several (read one at a time), or a (D,) vector.
Source = Union[int, list, torch.Tensor]


@dataclass
class Evaluated:
    """One model's test metrics (the task's: ``metrics[metric]`` selects, "loss" is there too)."""

    metrics: dict[str, float]
    metric: str
    state_dict: dict | None = None  # with recalibrated BatchNorm, when asked for
    time_s: float = 0.0  # loading the weights, recalibrating BatchNorm and the test pass

    @property
    def value(self) -> float:
        """The task's metric (image classification: test accuracy, percent)."""
        return self.metrics[self.metric]

    @property
    def loss(self) -> float:
        return self.metrics["loss"]

    @property
    def accuracy(self) -> float:
        """Image classification's metric, ``metrics["acc"]`` (percent)."""
        return self.metrics["acc"]


def _vector(source: Source, store: CandidateStore | None) -> torch.Tensor:
    if isinstance(source, torch.Tensor):
        return source
    if store is None:
        raise ValueError("a candidate index needs a store")
    if isinstance(source, int):
        return store.read_flat(source)
    return streaming_mean(store.read_flat(index) for index in source)  # one candidate in memory at a time


def evaluate_sources(
    cfg: Config, sources: dict[str, Source], store_uri: str | None = None, cwd: str | None = None,
    keep_state: tuple[str, ...] = (),
) -> dict[str, Evaluated]:
    """Evaluate each named source on the test split (in this process)."""
    device = task_device()
    task = task_from_config(cfg, "eval", cwd)
    data = task_data(task, include_test=True, reason=f"test {task.metric} of {', '.join(sources)}")
    model = task.build_model().to(device)
    store = CandidateStore.open(store_uri) if store_uri else None
    bn_loader = calibration_loader(data.train_eval, cfg.data.eval_batch_size, cfg.twa.bn_batches, cfg.seed,
                                   data.collate_fn)
    out, progress = {}, Progress("evaluation", total=len(sources), unit="model", logger=log)
    for i, (name, source) in enumerate(sources.items()):
        started = time.perf_counter()
        assign_flat(model, _vector(source, store).to(device))
        recalibrate_bn_by_task(model, task, bn_loader, device)
        result = evaluate(model, data.test, task, device, cfg.data.eval_batch_size, collate_fn=data.collate_fn)
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if name in keep_state else None
        out[name] = Evaluated(result.metrics, task.metric, state, time.perf_counter() - started)
        progress.done(i, model=name, **{f"test_{task.metric}": round(result.value, 4)}, test_loss=result.loss)
    return out


def evaluate_on_ray(
    cfg: Config, sources: dict[str, Source], store_uri: str | None = None, cwd: str | None = None,
    keep_state: tuple[str, ...] = (),
) -> dict[str, Evaluated]:
    """``evaluate_sources`` in a Ray task (on a GPU when the cluster has one)."""
    import ray

    return ray.get(run_task(evaluate_sources, cfg, sources, store_uri, cwd, keep_state))


@dataclass
class EvaluationRun:
    """The results of :func:`evaluate_parallel` and what they cost.

    Attributes:
        results: per source name (in the order given) its result.
        tasks: the Ray tasks the sources were spread over.
        wall_s: the driver's seconds from submitting the tasks to having every result.
        compute_s: the longest task's seconds inside its evaluation loop (the tasks run
            side by side); ``wall_s - compute_s`` is start-up (workers, data, the store).
    """

    results: dict[str, Evaluated] = field(default_factory=dict)
    tasks: int = 0
    wall_s: float = 0.0
    compute_s: float = 0.0


def evaluate_parallel(
    cfg: Config, sources: dict[str, Source], store_uri: str | None = None, cwd: str | None = None,
    keep_state: tuple[str, ...] = (), max_tasks: int | None = None,
) -> EvaluationRun:
    """``evaluate_sources`` spread over concurrent Ray tasks, one per model up to
    ``max_tasks`` (default: as many as the cluster's CPUs, or GPUs, allow); the results
    equal one task's (see the module docstring)."""
    import ray

    names = list(sources)
    parts = max(1, min(task_slots(max_tasks), len(names)))
    chunks = [names[k::parts] for k in range(parts)]
    started = time.perf_counter()
    refs = [run_task(evaluate_sources, cfg, {n: sources[n] for n in chunk}, store_uri, cwd, keep_state)
            for chunk in chunks]
    done = ray.get(refs)
    wall = time.perf_counter() - started
    merged = {k: v for part in done for k, v in part.items()}
    compute = max((sum(r.time_s for r in part.values()) for part in done), default=0.0)
    log.info("evaluated %d models in %d task(s): %.1f s (%.1f s of it evaluating)", len(names), parts, wall, compute)
    return EvaluationRun({n: merged[n] for n in names}, parts, wall, compute)
