"""Fixed-weight baselines and BatchNorm recalibration.

SWA is the uniform average of the candidates taken after training began (the TWA
center, X = 0, when TWA uses the same candidates); best-k the uniform average of the k
with the best validation accuracy; EMA an exponential moving average of the weights
kept at every optimizer step. BatchNorm statistics are not part of w: after any
averaging they are recomputed on training data with ``torch.optim.swa_utils.update_bn``.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Mapping, Sequence

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


class _ForwardBy(nn.Module):
    """``model`` reached through ``forward(batch)`` (a task's or a trainer's loss): ``update_bn``
    finds the BatchNorm layers of ``model`` and calls this on each batch."""

    def __init__(self, model: nn.Module, forward: Callable[[Any], Any]) -> None:
        super().__init__()
        self.model = model
        self._forward = forward

    def forward(self, batch: Any) -> Any:
        return self._forward(batch)


def recalibrate_bn_with(
    model: nn.Module, forward: Callable[[Any], Any], batches: Iterable, max_batches: int | None = None
) -> None:
    """``recalibrate_bn`` for batches of any shape: ``forward(batch)`` runs ``model`` on one
    (moving it to the device itself). No-op without BatchNorm."""
    if not has_batchnorm(model):
        return
    batches = ((batch,) for batch in batches)  # update_bn passes item[0] on
    recalibrate_bn(_ForwardBy(model, forward), batches, None, max_batches)


def streaming_mean(vectors: Iterable[torch.Tensor]) -> torch.Tensor:
    """Uniform average (D,) float32 of (D,) vectors taken one at a time, summed in one (D,)
    float64 accumulator: n candidates never need to be in memory together (n x D floats
    were 6 GB for VGG16-BN with 101 candidates)."""
    total, count = None, 0
    for vector in vectors:
        if total is None:
            total = vector.reshape(-1).to(torch.float64, copy=True)
        elif vector.numel() != total.numel():
            raise ValueError(f"vector {count} has {vector.numel()} values, the first {total.numel()}")
        else:
            total += vector.reshape(-1)
        count += 1
    if total is None:
        raise ValueError("the average of no vectors")
    return (total / count).float()


def swa_vector(candidates: torch.Tensor) -> torch.Tensor:
    """Uniform average (D,) of candidates (n, D), accumulated in float64 (``streaming_mean``
    over the rows: the same sum as the streamed SWA of stored candidates)."""
    return streaming_mean(candidates.unbind(0))


@torch.no_grad()
def apply_swa(
    model: nn.Module, candidates: torch.Tensor, loader: Iterable | None = None, device: torch.device | None = None
) -> nn.Module:
    """Load the SWA point of ``candidates`` (n, D) into ``model`` and recalibrate BatchNorm."""
    assign_flat(model, swa_vector(candidates).to(next(model.parameters()).device))
    if loader is not None:
        recalibrate_bn(model, loader, device)
    return model


# ---------------------------------------------------------------- which candidates

INITIAL_KIND = "initial"  # info kind of the weights saved before the first step


def after_start(candidates: Sequence[tuple[int, Mapping]]) -> list[int]:
    """Indices of the candidates taken after training began: every (index, info) pair
    whose info kind is not ``"initial"``, in the given order. SWA averages these; the
    random initial weights would only drag the average towards chance."""
    return [index for index, info in candidates if info.get("kind") != INITIAL_KIND]


def best_k(candidates: Sequence[tuple[int, Mapping]], k: int, metric: str = "val_acc",
           higher_is_better: bool = True) -> list[int]:
    """Indices of the ``k`` candidates with the best ``info["metrics"][metric]`` (the highest,
    or the lowest when not ``higher_is_better``), sorted by index (timm's ``avg_checkpoints``:
    the uniform average of the best k checkpoints).

    The initial weights and candidates without the metric (saved inside an epoch) never
    count; ties go to the later candidate. Fewer than ``k`` when fewer qualify.
    """
    if k < 1:
        raise ValueError(f"best_k needs k >= 1, got {k}")
    sign = 1.0 if higher_is_better else -1.0
    scored = [(sign * float(info["metrics"][metric]), index) for index, info in candidates
              if info.get("kind") != INITIAL_KIND and metric in (info.get("metrics") or {})]
    return sorted(index for _, index in sorted(scored, reverse=True)[:k])


# ---------------------------------------------------------------- EMA of the weights


def ema_decay(updates: int, decay: float, warmup: bool = True) -> float:
    """The decay of the EMA update that follows ``updates`` earlier ones (timm ModelEmaV3).

    The first update (``updates == 0``) copies the weights. After that the decay is
    ``decay``, or with ``warmup`` ``min(decay, 1 - (1 + updates) ** (-2/3))``: early in
    training the average forgets fast and only approaches ``decay`` after many steps
    (0.9998 would need about 5000 steps before the initial weights fade to 1/e, longer
    than a short run), so the default decay is sane for runs of any length.
    """
    if updates <= 0:
        return 0.0
    if not warmup:
        return decay
    return min(decay, 1.0 - (1.0 + updates) ** (-2.0 / 3.0))


@torch.no_grad()
def ema_update_(ema: Sequence[torch.Tensor], current: Sequence[torch.Tensor], decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * current``, in place, tensor by tensor (each
    ``ema[i]`` has ``current[i]``'s shape; torch's ``get_ema_multi_avg_fn`` update)."""
    if len(ema) != len(current):
        raise ValueError(f"{len(ema)} EMA tensors for {len(current)} weights")
    if ema:
        torch._foreach_lerp_(list(ema), [c.detach() for c in current], 1.0 - decay)
