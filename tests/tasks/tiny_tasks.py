"""Tasks for the tests, imported by path (``task: tiny_tasks:Regression`` from tests/tasks)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

from twa_ray.tasks import TaskBase, TaskData


class Regression(TaskBase):
    """y = x @ w + noise; an MLP with LayerNorm; metric ``mse`` (lower is better)."""

    metric = "mse"
    higher_is_better = False

    def __init__(self, n: int = 96, features: int = 5) -> None:
        self.n, self.features = n, features

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(self.features, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 1))

    def datasets(self) -> TaskData:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(self.n, self.features, generator=gen)
        y = x @ torch.linspace(-1, 1, self.features) + 0.1 * torch.randn(self.n, generator=gen)
        part = self.n // 4
        return TaskData(TensorDataset(x[2 * part:], y[2 * part:]), TensorDataset(x[:part], y[:part]),
                        TensorDataset(x[part:2 * part], y[part:2 * part]))

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return ((model(x).squeeze(1) - y) ** 2).sum()

    def evaluate(self, model: nn.Module, batch) -> dict:
        x, y = batch
        err = ((model(x).squeeze(1) - y) ** 2).sum()
        return {"loss": (err, len(y)), "mse": (err, len(y))}


class NotATask:
    """Has a model, but no data, loss or metric."""

    def build_model(self) -> nn.Module:
        return nn.Linear(2, 2)
