"""A tiny CNN for quickstarts on CPU (Fashion-MNIST, small CIFAR runs)."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU stages (the first two max-pooled), global average pool, linear head.

    Input (B, in_channels, H, W) with H, W >= 4; output (B, num_classes) logits.
    """

    def __init__(self, num_classes: int, in_channels: int, widths: tuple[int, ...] = (16, 32, 64)):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, c_out in enumerate(widths):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))  # (B, num_classes)


def small_cnn(num_classes: int, in_channels: int, image_size: int, **kwargs) -> SmallCNN:
    return SmallCNN(num_classes, in_channels, **kwargs)  # any image_size >= 4
