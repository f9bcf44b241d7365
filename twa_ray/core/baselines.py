"""Fixed-weight baselines and BatchNorm recalibration.

SWA is the uniform average of the candidates (the TWA center, X = 0). BatchNorm
statistics are not part of w: after any averaging they are recomputed on training data
with ``torch.optim.swa_utils.update_bn``.
"""
from __future__ import annotations

import itertools
from typing import Iterable

import torch
from torch import nn

from .params import assign_flat


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def recalibrate_bn(
    model: nn.Module, loader: Iterable, device: torch.device | None = None, max_batches: int | None = None
) -> None:
    """Recompute BatchNorm running statistics on ``loader`` (no-op without BatchNorm).

    Batches are tensors or (input, target, ...) tuples, as ``update_bn`` accepts.
    ``max_batches`` limits the pass to the first batches of the loader.
    """
    if not has_batchnorm(model):
        return
    if max_batches is not None:
        loader = list(itertools.islice(loader, max_batches))
    torch.optim.swa_utils.update_bn(loader, model, device)


def swa_vector(candidates: torch.Tensor) -> torch.Tensor:
    """Uniform average (D,) of candidates (n, D), accumulated in float64."""
    return (candidates.sum(dim=0, dtype=torch.float64) / candidates.shape[0]).float()


@torch.no_grad()
def apply_swa(
    model: nn.Module, candidates: torch.Tensor, loader: Iterable | None = None, device: torch.device | None = None
) -> nn.Module:
    """Load the SWA point of ``candidates`` (n, D) into ``model`` and recalibrate BatchNorm."""
    assign_flat(model, swa_vector(candidates).to(next(model.parameters()).device))
    if loader is not None:
        recalibrate_bn(model, loader, device)
    return model
