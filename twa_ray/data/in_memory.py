"""An image classification dataset held as tensors in memory."""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import Dataset

Transform = Callable[[torch.Tensor], torch.Tensor]


class InMemoryImageDataset(Dataset):
    """Images and labels kept as tensors; several datasets may share the same tensors.

    Args:
        images: (N, C, H, W) uint8 in [0, 255] (returned as float32 in [0, 1]) or float32
            (returned as is).
        targets: (N,) int64 class indices.
        transform: applied to one (C, H, W) float32 image, e.g. augmentation + normalisation.

    ``dataset[i]`` is ``(image, label)``: a (C, H, W) float32 tensor and an int.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, transform: Transform | None = None):
        if images.ndim != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if targets.shape != (images.shape[0],):
            raise ValueError(f"targets must be ({images.shape[0]},), got shape {tuple(targets.shape)}")
        self.images = images
        self.targets = targets.long()
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        image = image.float().div_(255.0) if image.dtype == torch.uint8 else image.float()
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])
