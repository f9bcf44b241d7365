"""A task's metrics of a model on a dataset, in one process or split across ranks (plain
PyTorch: every stage uses it; the test-split evaluation in Ray tasks is
``twa_ray.runtime.evaluation``)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..tasks import Task, Totals, to_device
from .process_group import all_reduce_sum


@dataclass
class EvalResult:
    """A task's metrics (``Task.summarize``: holds "loss" and the task's ``metric``) on
    ``count`` examples; ``value`` is the selection metric's."""

    metrics: dict[str, float]
    count: int
    metric: str = "loss"
    higher_is_better: bool = False

    @property
    def loss(self) -> float:
        return self.metrics.get("loss", math.nan)

    @property
    def value(self) -> float:
        return self.metrics.get(self.metric, math.nan)

    @property
    def accuracy(self) -> float:
        """Image classification's metric, ``metrics["acc"]`` (percent)."""
        return self.metrics["acc"]

    @property
    def score(self) -> float:
        """``value``, negated when lower is better: higher always selects."""
        return self.value if self.higher_is_better else -self.value


def _result(task: Task, totals: Totals, count: int) -> EvalResult:
    if count == 0:
        return EvalResult({"loss": math.nan, task.metric: math.nan}, 0, task.metric, task.higher_is_better)
    return EvalResult(totals.summarize(task), count, task.metric, task.higher_is_better)


def batch_loader(data: Dataset, batch_size: int, collate_fn: Callable | None = None) -> DataLoader:
    """Evaluation batches of ``data`` in order."""
    return DataLoader(data, batch_size=batch_size, collate_fn=collate_fn)


@torch.no_grad()
def _sums(model: nn.Module, task: Task, loader: Any, device, min_batches: int) -> tuple[Totals, int]:
    was_training = model.training
    model.eval()
    totals, batches, batch = Totals(), 0, None
    for batch in loader:
        batch = to_device(batch, device)
        totals.add(task.evaluate(model, batch))
        batches += 1
    for _ in range(batches, min_batches):
        task.evaluate(model, batch)
    model.train(was_training)
    # the examples are the dataset's: a batch's own structure is the task's business
    return totals, (len(loader.dataset) if batches else 0)


def evaluate(model: nn.Module, data: Dataset | DataLoader, task: Task, device: torch.device | str = "cpu",
             batch_size: int = 512, min_batches: int = 0, collate_fn: Callable | None = None) -> EvalResult:
    """``task``'s metrics of ``model`` on ``data``.

    ``min_batches``: forward passes to make at least, the last batch again (not counted):
    the ranks of a model whose forward pass is a collective (FSDP) must make as many."""
    loader = data if isinstance(data, DataLoader) else batch_loader(data, batch_size, collate_fn)
    totals, count = _sums(model, task, loader, device, min_batches)
    return _result(task, totals, count)


def evaluate_across_ranks(
    model: nn.Module, data: Dataset, task: Task, rank: int, world: int, device: torch.device | str, batch_size: int,
    lockstep: bool = False, collate_fn: Callable | None = None,
) -> EvalResult:
    """``task``'s metrics of ``model`` on ``data``: rank r evaluates examples r, r + world, ...,
    and the sums are all-reduced, so every rank returns the result on all of ``data`` (a collective).
    ``lockstep``: every rank makes as many forward passes (a model sharded with FSDP:
    ``ShardingMode.lockstep``)."""
    indices = list(range(rank, len(data), world))
    batches = -(-len(range(0, len(data), world)) // batch_size) if lockstep else 0  # rank 0's, the most
    if indices:
        totals, count = _sums(model, task, batch_loader(Subset(data, indices), batch_size, collate_fn), device, batches)
        names = sorted(totals.sums)
    else:
        # fewer examples than ranks: forward passes on example 0, not counted (as many as rank 0
        # makes when in lockstep); they also name the metrics, which a task's batches all share
        uncounted, _ = _sums(model, task, batch_loader(Subset(data, [0]), batch_size, collate_fn), device, batches)
        totals, count, names = Totals(), 0, sorted(uncounted.sums)
    reduced = all_reduce_sum(torch.cat([totals.as_tensor(names), torch.tensor([count], dtype=torch.float64)]), device)
    total = Totals()
    total.sums = {n: list(v) for n, v in Totals.from_tensor(names, reduced[:-1]).items()}
    return _result(task, total, int(reduced[-1]))
