"""What the stages do with a task's batches: move them to a device, take the loss and its
metric sums, add sums over batches (and ranks) and turn them into metrics."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..core.baselines import recalibrate_bn_with
from .protocol import Sums, Task


def to_device(batch: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """``batch`` with every tensor in it (through tuples, lists and dicts) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, Mapping):
        return type(batch)({k: to_device(v, device, non_blocking) for k, v in batch.items()})
    if isinstance(batch, (list, tuple)):
        moved = [to_device(v, device, non_blocking) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


def loss_and_sums(task: Task, model: nn.Module, batch: Any) -> tuple[torch.Tensor, Sums]:
    """(the batch's summed training loss, the metric sums its forward pass gave, or {})."""
    out = task.loss(model, batch)
    if isinstance(out, tuple):
        loss, sums = out
        return loss, dict(sums)
    return out, {}


def _number(value: torch.Tensor | float) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


class Totals:
    """Metric sums added over batches: {name: (sum, count)} in float64."""

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = {}

    def add(self, sums: Sums) -> None:
        for name, (s, c) in sums.items():
            acc = self.sums.setdefault(name, [0.0, 0.0])
            acc[0] += _number(s)
            acc[1] += _number(c)

    def as_tensor(self, names: list[str]) -> torch.Tensor:
        """(2 * len(names),) float64: sum, count of each name (0, 0 where none was added)."""
        return torch.tensor([v for n in names for v in self.sums.get(n, (0.0, 0.0))], dtype=torch.float64)

    @staticmethod
    def from_tensor(names: list[str], values: torch.Tensor) -> dict[str, tuple[float, float]]:
        v = values.tolist()
        return {n: (v[2 * i], v[2 * i + 1]) for i, n in enumerate(names)}

    def summarize(self, task: Task) -> dict[str, float]:
        return task.summarize({n: (s, c) for n, (s, c) in self.sums.items()})


def recalibrate_bn_by_task(model: nn.Module, task: Task, batches: Any, device: torch.device | str,
                           max_batches: int | None = None) -> None:
    """BatchNorm running statistics of ``model`` recomputed on ``batches`` through the task's
    forward pass (``Task.evaluate``); a model without BatchNorm is left as it is."""
    recalibrate_bn_with(model, lambda batch: task.evaluate(model, to_device(batch, device)), batches, max_batches)
