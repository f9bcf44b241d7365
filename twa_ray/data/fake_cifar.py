"""Write a tiny CIFAR-10 / CIFAR-100 in the exact on-disk format torchvision reads (for tests)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def _dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_fake_cifar(root: str | Path, num_classes: int = 10, n_train: int = 100, n_test: int = 20,
                    seed: int = 0) -> Path:
    """Write random images in torchvision's CIFAR layout under ``root``; return the data folder.

    CIFAR-10: ``root/cifar-10-batches-py/data_batch_1..5`` (``n_train`` images split over
    the five batches), ``test_batch``, ``batches.meta``. CIFAR-100: ``root/cifar-100-python/
    train``, ``test``, ``meta``. Each batch is a pickled dict with ``data`` (N, 3072) uint8
    (channel-major rows of 32 x 32) and ``labels`` (CIFAR-10) or ``fine_labels`` +
    ``coarse_labels`` (CIFAR-100). Labels cycle through the classes.
    """
    if num_classes not in (10, 100):
        raise ValueError(f"num_classes must be 10 or 100, got {num_classes}")
    rng = np.random.RandomState(seed)
    root = Path(root)

    def batch(n: int, offset: int) -> tuple[np.ndarray, list[int]]:
        data = rng.randint(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
        return data, [int((offset + i) % num_classes) for i in range(n)]

    if num_classes == 10:
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        bounds = np.linspace(0, n_train, 6).astype(int)
        for b in range(5):
            data, labels = batch(bounds[b + 1] - bounds[b], bounds[b])
            _dump(folder / f"data_batch_{b + 1}", {"batch_label": f"training batch {b + 1} of 5",
                                                   "data": data, "labels": labels})
        data, labels = batch(n_test, 0)
        _dump(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "data": data, "labels": labels})
        _dump(folder / "batches.meta", {"label_names": [f"class_{i}" for i in range(10)],
                                        "num_cases_per_batch": int(bounds[1]), "num_vis": 3072})
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        for name, n in (("train", n_train), ("test", n_test)):
            data, labels = batch(n, 0)
            _dump(folder / name, {"data": data, "fine_labels": labels,
                                  "coarse_labels": [label // 5 for label in labels]})
        _dump(folder / "meta", {"fine_label_names": [f"class_{i}" for i in range(100)],
                                "coarse_label_names": [f"superclass_{i}" for i in range(20)]})
    return folder
