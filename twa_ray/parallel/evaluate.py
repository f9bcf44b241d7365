"""Accuracy and loss of a model on a dataset, in one process or split across ranks (plain
PyTorch: every stage uses it; the test-split evaluation in Ray tasks is
``twa_ray.runtime.evaluation``)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .process_group import all_reduce_sum


@dataclass
class EvalResult:
    accuracy: float  # percent
    loss: float
    count: int


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset | DataLoader, device: torch.device | str = "cpu", batch_size: int = 512,
             min_batches: int = 0) -> EvalResult:
    """Top-1 accuracy (percent) and mean cross-entropy of ``model`` on ``data``.

    ``min_batches``: forward passes to make at least, the last batch again (not counted):
    the ranks of a model whose forward pass is a collective (FSDP) must make as many."""
    loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size)
    was_training = model.training
    model.eval()
    correct, total, loss_sum, batches = 0, 0, 0.0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        out = model(x)
        loss_sum += float(nn.functional.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(dim=1) == y).sum())
        total += len(y)
        batches += 1
    for _ in range(batches, min_batches):
        model(x)
    model.train(was_training)
    if total == 0:
        return EvalResult(float("nan"), float("nan"), 0)
    return EvalResult(100.0 * correct / total, loss_sum / total, total)


def evaluate_across_ranks(
    model: nn.Module, data: Dataset, rank: int, world: int, device: torch.device | str, batch_size: int,
    lockstep: bool = False,
) -> EvalResult:
    """Accuracy and mean loss of ``model`` on ``data``: rank r evaluates examples r, r + world, ...,
    and the sums are all-reduced, so every rank returns the result on all of ``data`` (a collective).
    ``lockstep``: every rank makes as many forward passes (a model sharded with FSDP:
    ``ShardingMode.lockstep``)."""
    indices = list(range(rank, len(data), world))
    batches = -(-len(range(0, len(data), world)) // batch_size) if lockstep else 0  # rank 0's, the most
    if not indices and batches:  # fewer examples than ranks: forward passes on one example, not counted
        evaluate(model, Subset(data, [0]), device, batch_size=batch_size, min_batches=batches)
    res = evaluate(model, Subset(data, indices), device, batch_size=batch_size, min_batches=batches if indices else 0)
    sums = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
    if res.count:
        sums = torch.tensor([res.loss * res.count, round(res.accuracy * res.count / 100.0), res.count],
                            dtype=torch.float64)
    sums = all_reduce_sum(sums, device)
    count = int(sums[2])
    if count == 0:
        return EvalResult(math.nan, math.nan, 0)
    return EvalResult(100.0 * float(sums[1]) / count, float(sums[0]) / count, count)
