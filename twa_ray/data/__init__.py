"""Datasets and the train / val / test split. Plain PyTorch / torchvision (no Ray).

    >>> from twa_ray.data import build_splits
    >>> splits = build_splits("fashion_mnist", "./data", val_ratio=0.1, seed=0)
    >>> len(splits.train), len(splits.val), len(splits.test)
    (54000, 6000, 10000)

Datasets: ``fashion_mnist``, ``cifar10``, ``cifar100``, ``imagefolder``, ``synthetic``.
"""

from .calibration import calibration_loader
from .errors import DatasetNotFoundError
from .fake_cifar import make_fake_cifar
from .fashion_mnist import read_idx
from .in_memory import InMemoryImageDataset
from .registry import DATASETS, available_datasets, load_source
from .source import SourceData
from .splits import DataSplits, build_splits, split_indices
from .transforms import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
)

__all__ = [
    "DATASETS",
    "DataSplits",
    "DatasetNotFoundError",
    "InMemoryImageDataset",
    "SourceData",
    "available_datasets",
    "calibration_loader",
    "build_splits",
    "load_source",
    "make_fake_cifar",
    "read_idx",
    "split_indices",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]
