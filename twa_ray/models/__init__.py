"""Models by name. Plain PyTorch / torchvision (no Ray).

    >>> from twa_ray.models import build_model
    >>> model = build_model("preresnet164", num_classes=10, in_channels=3, image_size=32)

CIFAR-style models take any in_channels and work for 28x28 and 32x32 inputs (adaptive
pooling). ``tv:<name>`` builds any torchvision classification model without weights.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from .mlp import MLP, mlp
from .preresnet import PreResNet, preresnet164
from .resnet import ResNet, resnet18
from .small_cnn import SmallCNN, small_cnn
from .torchvision_models import torchvision_model
from .vgg import VGG, vgg16bn
from .vit import ViT, vit_small
from .wide_resnet import WideResNet, wrn28_10

# name -> constructor(num_classes, in_channels, image_size, **kwargs)
MODELS: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": small_cnn,
    "mlp": mlp,
    "resnet18": resnet18,
    "vgg16bn": vgg16bn,
    "preresnet164": preresnet164,
    "wrn28_10": wrn28_10,
    "vit_small": vit_small,
}
TORCHVISION_PREFIX = "tv:"


def available_models() -> list[str]:
    """Registered names; any ``tv:<torchvision name>`` is accepted as well."""
    return sorted(MODELS)


def build_model(name: str, num_classes: int, in_channels: int, image_size: int, **kwargs) -> nn.Module:
    """Build model ``name`` for (B, in_channels, image_size, image_size) inputs -> (B, num_classes) logits.

    ``kwargs`` go to the model's constructor (e.g. ``depth``, ``width`` for ``wrn28_10``).
    """
    if name.startswith(TORCHVISION_PREFIX):
        return torchvision_model(name[len(TORCHVISION_PREFIX):], num_classes, in_channels, image_size, **kwargs)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r} (model.name); valid names: {', '.join(available_models())}, "
                         f"or {TORCHVISION_PREFIX}<torchvision model name>")
    return MODELS[name](num_classes, in_channels, image_size, **kwargs)


__all__ = [
    "MLP", "MODELS", "PreResNet", "ResNet", "SmallCNN", "TORCHVISION_PREFIX", "VGG", "ViT", "WideResNet",
    "available_models", "build_model",
]
