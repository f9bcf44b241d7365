"""A folder of images, one subfolder per class: ``root/train/<class>/*`` and ``root/val/<class>/*``.

``train/`` is the official training set (the val split is held out from it); ``val/``
serves as the test split, as for ImageNet. Images are read lazily with PIL.
"""

from __future__ import annotations

from pathlib import Path

from torchvision.datasets import ImageFolder

from .errors import DatasetNotFoundError
from .source import SourceData
from .transforms import imagefolder_transforms


def load_imagefolder(root: str | Path | None, *, download: bool = False, augment: bool = True,
                     image_size: int = 224) -> SourceData:
    """Index ``root/train`` and ``root/val``; images come out as (3, image_size, image_size).

    ImageNet normalisation; with ``augment`` RandomResizedCrop + horizontal flip, else
    (and for evaluation) resize to image_size * 256 / 224 and center crop.
    """
    if download:
        raise ValueError("data.download is not supported for imagefolder: point data.root at a local folder")
    layout = "data.root/train/<class>/<image> and data.root/val/<class>/<image>"
    if root is None:
        raise DatasetNotFoundError(f"imagefolder needs data.root: a folder laid out as {layout}")
    missing = [str(Path(root) / s) for s in ("train", "val") if not (Path(root) / s).is_dir()]
    if missing:
        raise DatasetNotFoundError(f"imagefolder: missing {', '.join(missing)}; expected {layout}")
    train_dir, val_dir = str(Path(root) / "train"), str(Path(root) / "val")
    probe_train, probe_test = ImageFolder(train_dir), ImageFolder(val_dir)
    if probe_train.classes != probe_test.classes:
        raise ValueError(f"imagefolder: class folders differ between {train_dir} ({len(probe_train.classes)}) "
                         f"and {val_dir} ({len(probe_test.classes)})")
    train_t, eval_t = imagefolder_transforms(image_size, augment)
    # ImageFolder only holds (path, label) pairs; indexing the folder once more per view is cheap
    # next to reading the images, and keeps each view's transform separate.
    return SourceData(
        make_train=lambda transform: ImageFolder(train_dir, transform=transform),
        make_test=lambda transform: ImageFolder(val_dir, transform=transform),
        num_train=len(probe_train), num_test=len(probe_test), num_classes=len(probe_train.classes),
        in_channels=3, image_size=image_size, train_transform=train_t, eval_transform=eval_t,
    )
