"""CIFAR-style VGG16 with BatchNorm and a small 512-512 classifier (~15.3M params), as in the SWA code."""

from __future__ import annotations

import math

import torch
from torch import nn

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """Input (B, in_channels, H, W); output (B, num_classes).

    Max-pools use ceil_mode so 28x28 inputs reach 1x1 like 32x32 ones (28-14-7-4-2-1);
    an adaptive average pool makes the classifier independent of the input size.
    """

    def __init__(self, cfg, num_classes: int, in_channels: int, dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, stride=2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(c_in, 512), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(512, 512), nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )
        for m in self.modules():  # the SWA/TWA code's initialisation
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def vgg16bn(num_classes: int, in_channels: int, image_size: int, **kwargs) -> VGG:
    return VGG(VGG16_CFG, num_classes, in_channels, **kwargs)
