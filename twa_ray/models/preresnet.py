"""Pre-activation ResNet for CIFAR (He et al. 2016), as in the SWA / TWA papers' code.

PreResNet-164: bottleneck blocks, (164 - 2) / 9 = 18 per stage, widths 16-32-64 (x4),
~1.70M params for 10 classes.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class PreActBasic(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus the (projected) input."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        return out + residual


class PreActBottleneck(nn.Module):
    """BN-ReLU-conv1x1, BN-ReLU-conv3x3 (strided), BN-ReLU-conv1x1 to 4x planes, plus the input."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + residual


class PreResNet(nn.Module):
    """Input (B, in_channels, H, W) (32x32 or 28x28); output (B, num_classes).

    depth = 9n + 2 with bottleneck blocks (164 -> n = 18), or 6n + 2 with basic blocks.
    """

    def __init__(self, num_classes: int, in_channels: int, depth: int = 164, bottleneck: bool = True):
        super().__init__()
        block = PreActBottleneck if bottleneck else PreActBasic
        per_block = 9 if bottleneck else 6
        if depth < per_block + 2 or (depth - 2) % per_block:
            raise ValueError(f"PreResNet depth must be {per_block}n + 2 with "
                             f"{'bottleneck' if bottleneck else 'basic'} blocks, got {depth}")
        n = (depth - 2) // per_block
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.c_in = 16
        self.layer1 = self._make_layer(block, 16, n, stride=1)
        self.layer2 = self._make_layer(block, 32, n, stride=2)
        self.layer3 = self._make_layer(block, 64, n, stride=2)
        self.bn = nn.BatchNorm2d(self.c_in)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.c_in, num_classes)
        for m in self.modules():  # the SWA/TWA code's initialisation
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))

    def _make_layer(self, block, planes: int, n: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.c_in != planes * block.expansion:
            downsample = nn.Conv2d(self.c_in, planes * block.expansion, 1, stride=stride, bias=False)
        layers = [block(self.c_in, planes, stride, downsample)]
        self.c_in = planes * block.expansion
        layers += [block(self.c_in, planes, 1, None) for _ in range(n - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))  # (B, 64 * expansion, H/4, W/4)
        out = self.relu(self.bn(out))
        return self.fc(self.pool(out).flatten(1))


def preresnet164(num_classes: int, in_channels: int, image_size: int, **kwargs) -> PreResNet:
    return PreResNet(num_classes, in_channels, **kwargs)
