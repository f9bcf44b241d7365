"""A tiny multilayer perceptron without BatchNorm (exactness tests of distributed training)."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """Flatten, then Linear-ReLU per hidden width, then a linear head.

    Input (B, in_channels, image_size, image_size); output (B, num_classes) logits. The
    forward pass is a function of the parameters only (no buffers, no batch statistics),
    so the data-parallel mean gradient equals the single-process gradient. ``dropout`` > 0
    adds dropout after each hidden layer (randomness for exact-resume tests).
    """

    def __init__(self, num_classes: int, in_channels: int, image_size: int, hidden: tuple[int, ...] = (64,),
                 dropout: float = 0.0):
        super().__init__()
        dims = [in_channels * image_size * image_size, *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(d_in, d_out), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(dims[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, num_classes)


def mlp(num_classes: int, in_channels: int, image_size: int, **kwargs) -> MLP:
    return MLP(num_classes, in_channels, image_size, **kwargs)
