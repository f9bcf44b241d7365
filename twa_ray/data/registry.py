"""Datasets by name: ``fashion_mnist``, ``cifar10``, ``cifar100``, ``imagefolder``, ``synthetic``."""

from __future__ import annotations

from functools import partial
from typing import Callable

from .cifar import load_cifar
from .fashion_mnist import load_fashion_mnist
from .imagefolder import load_imagefolder
from .source import SourceData
from .synthetic import load_synthetic

# name -> loader(root, *, download, augment, **options) -> SourceData
DATASETS: dict[str, Callable[..., SourceData]] = {
    "fashion_mnist": load_fashion_mnist,
    "cifar10": partial(load_cifar, num_classes=10),
    "cifar100": partial(load_cifar, num_classes=100),
    "imagefolder": load_imagefolder,
    "synthetic": load_synthetic,
}


def available_datasets() -> list[str]:
    """Names accepted by ``load_source`` and ``build_splits``."""
    return sorted(DATASETS)


def load_source(name: str, root, *, download: bool = False, augment: bool = True, **options) -> SourceData:
    """Load the official train / test sets of dataset ``name`` (see ``DATASETS``)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r} (data.name); valid names: {', '.join(available_datasets())}")
    return DATASETS[name](root, download=download, augment=augment, **options)
