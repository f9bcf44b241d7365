"""The built-in task (``task: image_classification``): a ``model:`` network on a ``data:``
dataset, cross-entropy (with the stage's label smoothing) and top-1 accuracy in percent."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..config import Config
from ..data import DataSplits
from ..data.from_config import build_config_splits
from ..models.from_config import model_from_spec, model_spec
from .protocol import TaskBase, TaskData


class ImageClassification(TaskBase):
    """Batches are (images (B, C, H, W), labels (B,)); the model maps images to logits (B, classes).

    Metrics: ``loss`` (mean cross-entropy, no smoothing) and ``acc`` (top-1, percent), which selects.
    """

    metric = "acc"
    higher_is_better = True

    def __init__(self, cfg: Config | None = None, root_base: str | Path | None = None,
                 label_smoothing: float = 0.0) -> None:
        """``cfg`` (its ``data:`` and ``model:``) is needed for the data and the model only:
        ``ImageClassification()`` is the loss and metrics of any (images, labels) batches."""
        self.cfg = cfg
        self.root_base = root_base
        self.label_smoothing = label_smoothing

    @functools.cached_property
    def splits(self) -> DataSplits:
        """``data:``'s splits, test unsealed (the library seals it where it must be)."""
        if self.cfg is None:
            raise ValueError("ImageClassification() without a config has no data or model: give it the Config")
        return build_config_splits(self.cfg, self.root_base)

    def spec(self) -> dict:
        """What ``load_model`` rebuilds the model from (JSON-able: ``models.from_config.model_spec``)."""
        return model_spec(self.cfg, self.splits)

    def build_model(self) -> nn.Module:
        return model_from_spec(self.spec())

    def datasets(self) -> TaskData:
        s = self.splits
        return TaskData(s.train, s.val, s.test, train_eval=s.train_eval)

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict]:
        x, y = batch
        out = model(x)  # (B, classes)
        loss = nn.functional.cross_entropy(out, y, reduction="sum", label_smoothing=self.label_smoothing)
        with torch.no_grad():
            correct = (out.argmax(1) == y).sum()
        return loss, {"acc": (correct, len(y))}

    def evaluate(self, model: nn.Module, batch: Any) -> dict:
        x, y = batch
        out = model(x)
        return {"loss": (nn.functional.cross_entropy(out, y, reduction="sum"), len(y)),
                "acc": ((out.argmax(1) == y).sum(), len(y))}

    def summarize(self, sums: Mapping[str, tuple[float, float]]) -> dict[str, float]:
        out = super().summarize(sums)
        if "acc" in out:
            out["acc"] *= 100.0
        return out
