"""twa_ray.models: every model builds, runs forward/backward, and has the papers' size."""

import pytest
import torch
from torch import nn

from twa_ray.models import MODELS, available_models, build_model

SHAPES = [(1, 28), (3, 32)]


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry():
    assert available_models() == sorted(
        ["mlp", "preresnet164", "resnet18", "small_cnn", "vgg16bn", "vit_small", "wrn28_10"])
    with pytest.raises(ValueError, match="unknown model 'resnet9'.*preresnet164.*tv:"):
        build_model("resnet9", num_classes=10, in_channels=3, image_size=32)


@pytest.mark.parametrize("in_channels,image_size", SHAPES)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_backward(name, in_channels, image_size):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=in_channels, image_size=image_size)
    x = torch.randn(2, in_channels, image_size, image_size)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name,expected_millions", [
    ("resnet18", 11.17),
    ("vgg16bn", 15.25),
    ("preresnet164", 1.70),
    ("wrn28_10", 36.5),
])
def test_param_counts_match_papers(name, expected_millions):
    model = build_model(name, num_classes=10, in_channels=3, image_size=32)
    assert _num_params(model) / 1e6 == pytest.approx(expected_millions, rel=0.02)


def test_preresnet164_depth_counts_164_layers():
    model = build_model("preresnet164", num_classes=10, in_channels=3, image_size=32)
    assert len(model.layer1) == len(model.layer2) == len(model.layer3) == 18
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and "downsample" not in name]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) + len(linears) == 164  # stem + 18 x 3 stages x 3 convs + fc


def test_reduced_depth_options():
    x = torch.randn(2, 3, 32, 32)
    small_pre = build_model("preresnet164", 10, 3, 32, depth=11)  # one bottleneck per stage
    assert small_pre(x).shape == (2, 10) and len(small_pre.layer1) == 1
    basic_pre = build_model("preresnet164", 10, 3, 32, depth=20, bottleneck=False)
    assert basic_pre(x).shape == (2, 10) and len(basic_pre.layer1) == 3
    small_wrn = build_model("wrn28_10", 10, 3, 32, depth=10, width=2)
    assert small_wrn(x).shape == (2, 10) and _num_params(small_wrn) < 1e6
    with pytest.raises(ValueError, match="depth"):
        build_model("preresnet164", 10, 3, 32, depth=100)
    with pytest.raises(ValueError, match="depth"):
        build_model("wrn28_10", 10, 3, 32, depth=27)


def test_mlp_has_no_batchnorm_or_buffers():
    model = build_model("mlp", num_classes=10, in_channels=1, image_size=28)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert list(model.buffers()) == []


def test_vit_rejects_indivisible_size():
    with pytest.raises(ValueError, match="divisible"):
        build_model("vit_small", num_classes=10, in_channels=3, image_size=30)


def test_torchvision_models():
    model = build_model("tv:resnet18", num_classes=10, in_channels=3, image_size=32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    gray = build_model("tv:resnet18", num_classes=5, in_channels=1, image_size=28)
    assert gray.conv1.in_channels == 1
    assert gray(torch.randn(2, 1, 28, 28)).shape == (2, 5)
    with pytest.raises(ValueError, match="tv:not_a_model.*tv:resnet50"):
        build_model("tv:not_a_model", num_classes=10, in_channels=3, image_size=32)
