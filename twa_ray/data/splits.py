"""Train / val / test splits: val is a seeded random part of the official training set."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from .registry import load_source
from .synthetic import load_synthetic


@dataclass
class DataSplits:
    """The datasets of one run. Each item is ``(image (C, H, W) float32, label int)``.

    train:      official training set minus val, with augmentation.
    val:        held-out part of the official training set, eval transform (may be empty).
    test:       official test split, eval transform.
    train_eval: the same indices as ``train`` with the eval transform (for BatchNorm
                recalibration and train accuracy).
    """

    train: Subset
    val: Subset
    test: Dataset
    train_eval: Subset
    num_classes: int
    in_channels: int
    image_size: int


def split_indices(n: int, val_ratio: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted (train, val) indices into range(n); val has round(val_ratio * n) seeded random ones.

    Raises ValueError naming ``data.val_ratio`` when it is outside [0, 1) or leaves train
    (or, when val_ratio > 0, val) empty.
    """
    if not 0.0 <= val_ratio < 1.0:
        raise ValueError(f"data.val_ratio must be in [0, 1), got {val_ratio}")
    n_val = round(val_ratio * n)
    if val_ratio > 0 and n_val == 0:
        raise ValueError(f"data.val_ratio={val_ratio} gives an empty val split of a {n}-image training set")
    if n_val >= n:
        raise ValueError(f"data.val_ratio={val_ratio} leaves no training images out of {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def _limit(indices: torch.Tensor, limit: int | None, field: str) -> list[int]:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise ValueError(f"data.{field} must be a positive int or null, got {limit!r}")
    return indices[:limit].tolist()


def build_splits(
    name: str,
    root: str | Path | None,
    *,
    val_ratio: float,
    seed: int,
    augment: bool = True,
    download: bool = False,
    synthetic: dict | None = None,
    image_size: int | None = None,
    limit_train: int | None = None,
    limit_val: int | None = None,
    limit_test: int | None = None,
) -> DataSplits:
    """Load dataset ``name`` from ``root`` and split it into train / val / test.

    Args:
        name: one of ``available_datasets()``.
        root: folder holding the data (see each loader); may be None for ``fashion_mnist``
            (system copy) and ``synthetic``.
        val_ratio: share of the official training set held out as val (0 = empty val).
        seed: seeds the val selection only (the data order is the loader's business).
        augment: random crop + flip on ``train`` (CIFAR, Fashion-MNIST, imagefolder).
        download: let torchvision download Fashion-MNIST / CIFAR into ``root`` if missing.
        synthetic: options of ``load_synthetic`` (num_train, num_test, num_classes, channels,
            image_size, noise, seed); used only when ``name == "synthetic"``.
        image_size: output size for ``imagefolder`` (default 224); other datasets have a fixed size.
        limit_train, limit_val, limit_test: keep only the first K images of the split (after
            the val split; ``train_eval`` follows ``train``), for quick runs.

    Example:
        >>> s = build_splits("synthetic", None, val_ratio=0.1, seed=0, synthetic={"num_train": 100})
        >>> len(s.train), len(s.val), s.train[0][0].shape
        (90, 10, torch.Size([3, 32, 32]))
    """
    options: dict = {}
    if name == "synthetic":
        options = dict(synthetic or {})
        valid = [p for p in inspect.signature(load_synthetic).parameters if p not in ("root", "download", "augment")]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"data.synthetic: unknown keys {unknown}; valid keys: {', '.join(valid)}")
    if image_size is not None:
        if name != "imagefolder":
            raise ValueError(f"data.image_size={image_size} applies to imagefolder only (dataset {name!r})")
        options["image_size"] = image_size
    source = load_source(name, root, download=download, augment=augment, **options)

    train_idx, val_idx = split_indices(source.num_train, val_ratio, seed)
    train_idx = _limit(train_idx, limit_train, "limit_train")
    val_idx = _limit(val_idx, limit_val, "limit_val")
    test_idx = _limit(torch.arange(source.num_test), limit_test, "limit_test")

    train_base = source.make_train(source.train_transform)
    eval_base = source.make_train(source.eval_transform)
    test_base = source.make_test(source.eval_transform)
    test = test_base if len(test_idx) == source.num_test else Subset(test_base, test_idx)
    return DataSplits(
        train=Subset(train_base, train_idx),
        val=Subset(eval_base, val_idx),
        test=test,
        train_eval=Subset(eval_base, train_idx),
        num_classes=source.num_classes,
        in_channels=source.in_channels,
        image_size=source.image_size,
    )
