"""Shared fixtures: tiny models and candidates, and a local Ray."""
import os

# Ray reads these when it is imported: keep every Ray test on the loopback, quiet.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "30")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]  # the repository: jobs/, configs/, twa_ray/


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


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray on 127.0.0.1 with 2 CPUs for one test module, shut down afterwards."""
    from twa_ray.distributed.ray_env import init_ray

    import ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


def ray_subprocess_env(**extra: str) -> dict:
    """Environment for a job subprocess that starts its own local Ray on the loopback."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", **extra)
    return env
