"""Accuracy and loss of a model on a dataset (plain PyTorch; every stage uses this)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


@dataclass
class EvalResult:
    accuracy: float  # percent
    loss: float
    count: int


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset | DataLoader, device: torch.device | str = "cpu", batch_size: int = 512) -> EvalResult:
    """Top-1 accuracy (percent) and mean cross-entropy of ``model`` on ``data``."""
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size)
    was_training = model.training
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss_sum += float(nn.functional.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(dim=1) == y).sum())
        total += len(y)
    model.train(was_training)
    if total == 0:
        return EvalResult(float("nan"), float("nan"), 0)
    return EvalResult(100.0 * correct / total, loss_sum / total, total)
