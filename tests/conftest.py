"""Shared fixtures: tiny models and candidates for core tests."""
import pytest
import torch
from torch import nn


def tiny_mlp(seed: int = 0, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 12)]
    if bn:
        layers.append(nn.BatchNorm1d(12))
    layers += [nn.ReLU(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers)


@pytest.fixture
def mlp():
    return tiny_mlp()


def perturbed_candidates(model: nn.Module, n: int, seed: int = 1, spread: float = 0.3) -> torch.Tensor:
    """(n, D) candidates around the model's weights."""
    from twa_ray.core import flatten_params

    gen = torch.Generator().manual_seed(seed)
    base = flatten_params(model)
    return base + spread * torch.randn(n, base.numel(), generator=gen)
