"""Wide ResNet (Zagoruyko & Komodakis 2016) for CIFAR, as in the SWA / TWA papers' code.

WRN-28-10: (28 - 4) / 6 = 4 pre-activation blocks per stage, widths 160-320-640, ~36.5M params.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WideBasic(nn.Module):
    """BN-ReLU-conv3x3 (dropout), BN-ReLU-conv3x3 (strided), plus the (projected) input."""

    def __init__(self, c_in: int, c_out: int, dropout: float, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=True)
        self.dropout = nn.Dropout(p=dropout)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=stride, padding=1, bias=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.conv1(F.relu(self.bn1(x))))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + self.shortcut(x)


class WideResNet(nn.Module):
    """Input (B, in_channels, H, W) (32x32 or 28x28); output (B, num_classes). depth = 6n + 4."""

    def __init__(self, num_classes: int, in_channels: int, depth: int = 28, width: int = 10, dropout: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=True)
        stages, c_in = [], widths[0]
        for i, c_out in enumerate(widths[1:]):
            blocks = []
            for j in range(n):
                blocks.append(WideBasic(c_in, c_out, dropout, stride=2 if (i > 0 and j == 0) else 1))
                c_in = c_out
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(c_in)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.layers(self.conv1(x))))  # (B, 64 * width, H/4, W/4)
        return self.fc(self.pool(out).flatten(1))


def wrn28_10(num_classes: int, in_channels: int, image_size: int, **kwargs) -> WideResNet:
    return WideResNet(num_classes, in_channels, **kwargs)
