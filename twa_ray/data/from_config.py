"""Config -> datasets: the splits ``data:`` describes and the data TWA trains and selects on.

The model's counterpart is ``twa_ray.models.from_config``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from ..config import Config
from .sealed import SealedSplit, record_test_read
from .splits import DataSplits, build_splits


def build_config_splits(cfg: Config, root_base: str | Path | None = None) -> DataSplits:
    """The train/val/test splits ``cfg.data`` describes, test unsealed; a relative
    ``data.root`` is resolved against ``root_base`` (the driver's cwd, for Ray workers)."""
    d = cfg.data
    root = Path(d.root)
    if root_base is not None and not root.is_absolute():
        root = Path(root_base) / root
    return build_splits(
        d.name, root, val_ratio=d.val_ratio, seed=cfg.seed, augment=d.augment, download=d.download,
        synthetic=dataclasses.asdict(d.synthetic) if d.name == "synthetic" else None,
        limit_train=d.limit_train, limit_val=d.limit_val, limit_test=d.limit_test,
    )


def splits_from_config(
    cfg: Config, root_base: str | Path | None = None, include_test: bool = False, reason: str = "evaluation"
) -> DataSplits:
    """:func:`build_config_splits` with the test split sealed (any read raises) unless
    ``include_test``: only the final evaluation asks for it, and each such read is recorded
    (``data.sealed``)."""
    splits = build_config_splits(cfg, root_base)
    if include_test:
        record_test_read(reason)
    else:
        splits.test = SealedSplit(len(splits.test))
    return splits


def twa_datasets(cfg: Config, splits: DataSplits) -> tuple[Dataset, Dataset | None]:
    """(data TWA trains its coefficients on, data to select on or None).

    With ``twa.select_ratio`` > 0 a seeded share of the val split is held back for
    selection: TWA-t trains on train, TWA-v on the rest of val, and both select on that
    same share, so their selection metrics compare. With 0, TWA-t selects on all of val
    and TWA-v (which trains on all of val) has nothing to select on. Test is never here.
    """
    train = splits.train if cfg.twa.data == "train" else splits.val
    if cfg.twa.select_ratio <= 0:
        return train, (splits.val if cfg.twa.data == "train" and len(splits.val) else None)
    n = len(splits.val)
    n_select = round(cfg.twa.select_ratio * n)
    if n_select == 0 or n_select == n:
        raise ValueError(f"twa.select_ratio={cfg.twa.select_ratio} leaves an empty part of the {n}-example val split")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 1)).tolist()
    select = Subset(splits.val, sorted(perm[:n_select]))
    if cfg.twa.data == "val":
        train = Subset(splits.val, sorted(perm[n_select:]))
    return train, select
