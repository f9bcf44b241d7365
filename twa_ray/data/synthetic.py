"""Generated image classification data: a smooth per-class pattern plus Gaussian noise."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .in_memory import InMemoryImageDataset
from .source import SourceData


def make_synthetic(n: int, *, num_classes: int, channels: int, image_size: int, noise: float,
                   seed: int, split_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (n, channels, image_size, image_size) float32 and labels (n,) int64.

    Class k's mean is a fixed random 4 x 4 pattern (drawn from ``seed``) upsampled to
    image_size; each image adds N(0, noise^2) pixel noise. Labels cycle 0..num_classes-1,
    so any prefix is class-balanced. ``split_offset`` gives train and test different noise.
    """
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, channels, 4, 4, generator=g)
    means = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
    g = torch.Generator().manual_seed(seed * 1_000_003 + split_offset + 1)
    labels = torch.arange(n) % num_classes
    images = means[labels] + noise * torch.randn(n, channels, image_size, image_size, generator=g)
    return images.float(), labels.long()


def load_synthetic(root: str | Path | None = None, *, download: bool = False, augment: bool = True,
                   num_train: int = 2000, num_test: int = 500, num_classes: int = 10, channels: int = 3,
                   image_size: int = 32, noise: float = 1.0, seed: int = 0) -> SourceData:
    """Synthetic data, deterministic from ``seed``; ``root``, ``download`` and ``augment`` are ignored.

    Images are already centred (zero-mean patterns plus noise): no normalisation, no augmentation.
    """
    common = dict(num_classes=num_classes, channels=channels, image_size=image_size, noise=noise, seed=seed)
    train_x, train_y = make_synthetic(num_train, split_offset=0, **common)
    test_x, test_y = make_synthetic(num_test, split_offset=1, **common)
    return SourceData(
        make_train=lambda transform: InMemoryImageDataset(train_x, train_y, transform),
        make_test=lambda transform: InMemoryImageDataset(test_x, test_y, transform),
        num_train=num_train, num_test=num_test, num_classes=num_classes, in_channels=channels,
        image_size=image_size, train_transform=None, eval_transform=None,
    )
