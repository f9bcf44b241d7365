"""CIFAR-10 / CIFAR-100 (50000 train / 10000 test, 3 x 32 x 32) in torchvision's layout.

``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` or
``root/cifar-100-python/{train, test, meta}``: the pickled batches of the official
archives (torchvision unpickles them; that is the official format).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import CIFAR10, CIFAR100

from .errors import DatasetNotFoundError
from .in_memory import InMemoryImageDataset
from .source import SourceData
from .transforms import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, tensor_transforms


class CIFAR10Folder(CIFAR10):
    """torchvision's CIFAR10 reading a user-named folder: checks that files exist, not their md5.

    torchvision compares every file with the md5 of the official archive, so a folder the
    user names (a re-packed copy, a subset, the fake data of the tests) is refused. With the
    md5s set to None, ``check_integrity`` tests existence only; the unpickled arrays are
    still checked for shape in ``_to_tensors``. Downloads go through the original class,
    which does check the archive's md5.
    """

    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


class CIFAR100Folder(CIFAR100):
    """torchvision's CIFAR100 reading a user-named folder (see ``CIFAR10Folder``)."""

    train_list = [[name, None] for name, _ in CIFAR100.train_list]
    test_list = [[name, None] for name, _ in CIFAR100.test_list]
    meta = {**CIFAR100.meta, "md5": None}


_SPECS = {
    10: (CIFAR10, CIFAR10Folder, CIFAR10_MEAN, CIFAR10_STD),
    100: (CIFAR100, CIFAR100Folder, CIFAR100_MEAN, CIFAR100_STD),
}


def cifar_files(num_classes: int) -> tuple[str, list[str]]:
    """(folder name, file names) of the on-disk layout for CIFAR-10 or CIFAR-100."""
    official, _, _, _ = _SPECS[num_classes]
    names = [n for n, _ in official.train_list + official.test_list] + [official.meta["filename"]]
    return official.base_folder, names


def _to_tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))  # (N, 3, 32, 32) uint8
    targets = torch.as_tensor(ds.targets, dtype=torch.int64)
    if images.shape[1:] != (3, 32, 32) or images.dtype != torch.uint8 or len(targets) != len(images):
        raise ValueError(f"{ds.root}/{ds.base_folder}: unexpected data, images {tuple(images.shape)} {images.dtype}")
    return images, targets


def load_cifar(root: str | Path | None, *, num_classes: int, download: bool = False,
               augment: bool = True) -> SourceData:
    """Load CIFAR-10 (``num_classes=10``) or CIFAR-100 (100) into memory.

    Images (N, 3, 32, 32) uint8, labels (N,) int64 (fine labels for CIFAR-100). With
    ``augment`` training images are padded by 4, randomly cropped to 32 and flipped.
    """
    official, folder_cls, mean, std = _SPECS[num_classes]
    if root is None:
        raise ValueError(f"data.root must name the folder that holds {official.base_folder}/")
    base_folder, names = cifar_files(num_classes)
    folder = Path(root) / base_folder
    missing = [n for n in names if not (folder / n).is_file()]
    if missing and download:
        official(str(root), train=True, download=True)
        missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DatasetNotFoundError(
            f"CIFAR-{num_classes} not found in {folder} (missing: {', '.join(missing)}). Expected "
            f"torchvision's layout {base_folder}/{{{', '.join(names)}}} under data.root={root}: "
            f"unpack the official archive {official.filename} there, or set data.download=true "
            "(needs internet)."
        )
    train_x, train_y = _to_tensors(folder_cls(str(root), train=True))
    test_x, test_y = _to_tensors(folder_cls(str(root), train=False))
    train_t, eval_t = tensor_transforms(mean, std, 32, crop_padding=4, augment=augment)
    return SourceData(
        make_train=lambda transform: InMemoryImageDataset(train_x, train_y, transform),
        make_test=lambda transform: InMemoryImageDataset(test_x, test_y, transform),
        num_train=len(train_y), num_test=len(test_y), num_classes=num_classes, in_channels=3, image_size=32,
        train_transform=train_t, eval_transform=eval_t,
    )
