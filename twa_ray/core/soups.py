"""Model-soup baselines (Wortsman et al., 2022): best individual, uniform soup, greedy soup.

Plain PyTorch. Candidates are the flat weight vectors of n fine-tuned models, an (n, D)
matrix. Every function takes the held-out evaluation as a parameter, ``score(w) -> float``
for a (D,) vector (higher is better; e.g. val accuracy), so the selection logic is pure
and testable; :func:`weights_scorer` builds one that loads the weights into a model and
recalibrates BatchNorm first (the statistics of an average are not the average of the
statistics).

    score = weights_scorer(model, lambda m: evaluate(m, val_data).accuracy, bn_data=train_loader)
    scores = individual_scores(candidates, score)
    best = best_individual(candidates, scores=scores)
    uniform = uniform_soup(candidates, score)
    greedy = greedy_soup(candidates, score, scores=scores)
    assign_flat(model, greedy.weights)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .baselines import has_batchnorm, recalibrate_bn, recalibrate_bn_with, swa_vector
from .params import assign_flat

Score = Callable[[torch.Tensor], float]  # (D,) weights -> held-out score, higher is better


@dataclass
class Soup:
    """An average of some candidates.

    Attributes:
        weights: (D,) float32, the mean of the member rows.
        members: rows of the candidate matrix averaged, in the order they were added.
        score: held-out score of ``weights`` (None when it was not evaluated).
        trace: greedy soup only: one {"candidate", "score", "added"} per candidate tried
            after the first, in the order tried (``score`` is that of the trial soup).
    """

    weights: torch.Tensor
    members: list[int]
    score: float | None = None
    trace: list[dict] = field(default_factory=list)


def _check(candidates: torch.Tensor) -> None:
    if candidates.dim() != 2 or candidates.shape[0] == 0:
        raise ValueError(f"candidates must be an (n, D) matrix with n >= 1, got shape {tuple(candidates.shape)}")


def _finite(value: float, what: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"the held-out score of {what} is {value} (empty held-out data?)")
    return value


def individual_scores(candidates: torch.Tensor, score: Score) -> list[float]:
    """Held-out score of each candidate row of ``candidates`` (n, D)."""
    _check(candidates)
    return [_finite(score(candidates[i]), f"candidate {i}") for i in range(candidates.shape[0])]


def _scores(candidates: torch.Tensor, score: Score | None, scores: Sequence[float] | None) -> list[float]:
    if scores is not None:
        if len(scores) != candidates.shape[0]:
            raise ValueError(f"got {len(scores)} scores for {candidates.shape[0]} candidates")
        return [_finite(s, f"candidate {i}") for i, s in enumerate(scores)]
    if score is None:
        raise ValueError("pass score (a function of the weights) or scores (one per candidate)")
    return individual_scores(candidates, score)


def best_individual(candidates: torch.Tensor, score: Score | None = None, scores: Sequence[float] | None = None) -> Soup:
    """The single candidate with the best held-out score (the first one on a tie).

    ``scores`` (one per row) saves re-evaluating when they are already known.
    """
    _check(candidates)
    values = _scores(candidates, score, scores)
    best = max(range(len(values)), key=lambda i: (values[i], -i))
    return Soup(candidates[best].float().clone(), [best], values[best])


def uniform_soup(candidates: torch.Tensor, score: Score | None = None) -> Soup:
    """The mean of all candidates (the SWA point); scored when ``score`` is given."""
    _check(candidates)
    weights = swa_vector(candidates)
    return Soup(weights, list(range(candidates.shape[0])), None if score is None else _finite(score(weights), "the uniform soup"))


def greedy_soup(candidates: torch.Tensor, score: Score, scores: Sequence[float] | None = None) -> Soup:
    """Greedy soup: sort candidates by held-out score (best first, ties by row); start
    from the best, and add each next one if the held-out score of the mean of the soup
    and it does not drop (>=).

    Evaluates ``score`` n - 1 times (plus n times unless ``scores`` is given). The
    running sum is kept in float64 (one (D,) vector besides ``candidates``).
    """
    _check(candidates)
    values = _scores(candidates, score, scores)
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    members = [order[0]]
    total = candidates[order[0]].double().clone()  # (D,) sum of the members
    best = values[order[0]]
    trace = []
    for i in order[1:]:
        trial = ((total + candidates[i].double()) / (len(members) + 1)).float()
        value = _finite(score(trial), f"the soup {members + [i]}")
        added = value >= best
        trace.append({"candidate": i, "score": value, "added": added})
        if added:
            members.append(i)
            total += candidates[i].double()
            best = value
    return Soup((total / len(members)).float(), members, best, trace)


def weights_scorer(
    model: nn.Module,
    metric: Callable[[nn.Module], float],
    bn_data: Iterable | None = None,
    bn_batches: int | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> Score:
    """A ``score(w)`` that loads (D,) weights ``w`` into ``model``, recalibrates its
    BatchNorm statistics on ``bn_data`` (first ``bn_batches`` batches; skipped without
    BatchNorm) and returns ``metric(model)`` (e.g. val accuracy). ``forward(model, batch)``
    runs the model on a batch of ``bn_data`` (default: ``update_bn``'s, on the batch's first item).

    ``model`` is overwritten on every call. Raises ValueError when the model has
    BatchNorm but no ``bn_data`` is given.
    """
    if has_batchnorm(model) and bn_data is None:
        raise ValueError("the model has BatchNorm: pass bn_data (training batches) to recalibrate its statistics")
    device = next(model.parameters()).device

    def score(weights: torch.Tensor) -> float:
        assign_flat(model, weights.to(device))
        if bn_data is not None and forward is not None:
            recalibrate_bn_with(model, lambda batch: forward(model, batch), bn_data, max_batches=bn_batches)
        elif bn_data is not None:
            recalibrate_bn(model, bn_data, device, max_batches=bn_batches)
        return float(metric(model))

    return score
