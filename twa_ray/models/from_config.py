"""Config -> model: the network ``model:`` names, shaped for the dataset.

    spec = model_spec(cfg, splits)        # JSON-able: what summary.json records
    model = model_from_spec(spec)         # the same network, without the config or the data

The data's counterpart is ``twa_ray.data.from_config``.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from ..config import Config
from ..data import DataSplits
from . import build_model

SPEC_KEYS = ("name", "kwargs", "num_classes", "in_channels", "image_size")


def model_spec(cfg: Config, splits: DataSplits) -> dict:
    """What builds the model ``cfg.model`` names for the dataset of ``splits``:
    {"name", "kwargs", "num_classes", "in_channels", "image_size"} (JSON-able)."""
    return {"name": cfg.model.name, "kwargs": dict(cfg.model.kwargs), "num_classes": splits.num_classes,
            "in_channels": splits.in_channels, "image_size": splits.image_size}


def model_from_spec(spec: Mapping[str, Any]) -> nn.Module:
    """The model a ``model_spec`` describes, for (B, in_channels, image_size, image_size)
    inputs -> (B, num_classes) logits; raises ValueError naming a missing key."""
    missing = [k for k in SPEC_KEYS if k not in spec]
    if missing:
        raise ValueError(f"model spec {dict(spec)!r} lacks {', '.join(missing)}")
    return build_model(spec["name"], spec["num_classes"], spec["in_channels"], spec["image_size"], **spec["kwargs"])


def model_from_config(cfg: Config, splits: DataSplits) -> nn.Module:
    """The model ``cfg.model`` names, shaped for the dataset of ``splits``."""
    return model_from_spec(model_spec(cfg, splits))
