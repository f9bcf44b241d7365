"""Any torchvision classification model by name (``tv:resnet50``), randomly initialised."""

from __future__ import annotations

from torch import nn
from torchvision import models as tv_models


def _replace_first_conv(model: nn.Module, in_channels: int, name: str) -> None:
    """Swap the first 3-channel Conv2d for one with ``in_channels`` inputs (same other settings)."""
    for path, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3:
            new = nn.Conv2d(in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                            padding=module.padding, dilation=module.dilation, groups=module.groups,
                            bias=module.bias is not None, padding_mode=module.padding_mode)
            parent_path, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent_path), attr, new)
            return
    raise ValueError(f"tv:{name}: no 3-channel Conv2d found to adapt to in_channels={in_channels}")


def torchvision_model(name: str, num_classes: int, in_channels: int, image_size: int, **kwargs) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)``.

    For in_channels != 3 the first 3-channel convolution is replaced. The input size is
    the model's own business (most torchvision models expect >= 32 px, ViTs exactly 224
    unless ``image_size`` is passed in kwargs).
    """
    valid = tv_models.list_models(module=tv_models)
    if name not in valid:
        raise ValueError(f"unknown torchvision classification model 'tv:{name}'; valid: "
                         + ", ".join(f"tv:{n}" for n in valid))
    model = tv_models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        _replace_first_conv(model, in_channels, name)
    return model
