"""What every dataset loader returns: the official train and test sets, before any split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch.utils.data import Dataset

Transform = Callable
DatasetFactory = Callable[[Transform | None], Dataset]


@dataclass(frozen=True)
class SourceData:
    """The official train / test sets of one dataset.

    ``make_train(transform)`` and ``make_test(transform)`` build a new dataset object over
    the same underlying data (shared in memory where possible), so the train and eval
    views of the training set can carry different transforms.
    """

    make_train: DatasetFactory
    make_test: DatasetFactory
    num_train: int
    num_test: int
    num_classes: int
    in_channels: int
    image_size: int
    train_transform: Transform | None
    eval_transform: Transform | None
