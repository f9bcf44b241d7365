"""What a task is: the model, the data, the loss and the metrics every stage runs on.

A task is any object with the members of :class:`Task`; subclass :class:`TaskBase` for the
defaults (no collate function, ``summarize`` as sum / count). A config names it by import
path (``task: my_package.my_module:MyTask``, built as ``MyTask(**task_args)``) or the
built-in ``image_classification``. Base training, TWA (both sharding modes), the
evaluations and baselines, Tune, the soups and ``load_model`` all go through it.

Batches are what the task's datasets and ``collate_fn`` make; the library moves their
tensors (in tuples, lists and dicts) to the device and hands them back unchanged, so only
the task looks inside. A metric is reduced as a (sum, count) pair, so ranks add them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.data import Dataset

Sums = Mapping[str, "tuple[torch.Tensor | float, torch.Tensor | float]"]


@dataclass
class TaskData:
    """A task's splits. ``test`` is read only by the final evaluation (the library seals it
    otherwise); ``train_eval``, the train examples without augmentation, recalibrates
    BatchNorm (default: ``train``); ``collate_fn`` makes a batch of items (default: torch's)."""

    train: Dataset
    val: Dataset
    test: Dataset
    train_eval: Dataset | None = None
    collate_fn: Callable[[list], Any] | None = None


@runtime_checkable
class Task(Protocol):
    """The protocol. ``metric`` names the selection metric, a key of ``summarize``'s result
    (e.g. ``"acc"``, ``"ppl"``), and ``higher_is_better`` says which way it selects."""

    metric: str
    higher_is_better: bool

    def build_model(self) -> nn.Module:
        """A new model, the same architecture every call (its initial weights follow torch's seed)."""

    def datasets(self) -> TaskData:
        """The train / val / test data."""

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor | tuple[torch.Tensor, Sums]:
        """The SUM over the batch's examples of each example's training loss (a scalar with
        grad); the library divides by the global batch's number of examples. May also return
        (loss, sums): metric sums of the same forward pass, reported as train_<name>."""

    def evaluate(self, model: nn.Module, batch: Any) -> Sums:
        """{name: (sum, count)} of the batch (no grad); must hold ``"loss"``."""

    def summarize(self, sums: Mapping[str, tuple[float, float]]) -> dict[str, float]:
        """The metrics of sums reduced over batches and ranks: must hold ``"loss"`` and ``metric``."""


REQUIRED = ("metric", "higher_is_better", "build_model", "datasets", "loss", "evaluate", "summarize")


class TaskBase:
    """Defaults for a task: ``summarize`` divides each sum by its count."""

    metric: str = "loss"
    higher_is_better: bool = False

    def summarize(self, sums: Mapping[str, tuple[float, float]]) -> dict[str, float]:
        return {name: (float(s) / float(c) if float(c) else float("nan")) for name, (s, c) in sums.items()}


def missing_members(task: Any) -> list[str]:
    """The members of :class:`Task` that ``task`` lacks or has of the wrong kind."""
    missing = [name for name in REQUIRED if not hasattr(task, name)]
    if not missing:
        if not isinstance(task.metric, str) or not task.metric:
            missing.append("metric (a non-empty str)")
        if not isinstance(task.higher_is_better, bool):
            missing.append("higher_is_better (a bool)")
        missing += [f"{name} (callable)" for name in REQUIRED[2:] if not callable(getattr(task, name))]
    return missing
