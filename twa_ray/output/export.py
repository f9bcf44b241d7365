"""A finished run folder, read back: its summary, the TWA model, and the model in another format.

    import twa_ray
    model = twa_ray.load_model("runs/quickstart")    # built, loaded, eval mode
    logits = model(images)                            # images (B, C, H, W) -> (B, num_classes)

``model.pt`` is a plain state_dict (read with ``weights_only=True``); summary.json's
``model_spec`` ({"name", "kwargs", "num_classes", "in_channels", "image_size"},
``models.from_config.model_spec``) says which network it belongs to.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from torch import nn

from ..store import fs as store_fs
from ..store.exporters import EXPORT_FORMATS, save_state_dict

SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.pt"


def read_summary(run_dir: str | Path) -> dict:
    """summary.json of ``run_dir`` (a local folder or a URI); FileNotFoundError naming the
    file when the run has none (not finished, or not a run folder)."""
    path = store_fs.as_location(run_dir) / SUMMARY_FILE
    if not store_fs.file_exists(path):
        raise FileNotFoundError(f"{path} does not exist: {run_dir} is not a finished run folder "
                                f"(summary.json is written last, when a run completes)")
    try:
        return json.loads(store_fs.read_file(path))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def load_state_dict(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """The TWA model's state_dict (``model.pt``, read with weights_only=True) on the CPU;
    ``run_dir`` is a local folder or a URI."""
    path = store_fs.as_location(run_dir) / MODEL_FILE
    if not store_fs.file_exists(path):
        raise FileNotFoundError(f"{path} does not exist: the run folder holds no TWA model")
    if isinstance(path, Path):
        return torch.load(path, map_location="cpu", weights_only=True)
    return torch.load(io.BytesIO(store_fs.read_file(path)), map_location="cpu", weights_only=True)


def load_model(run_dir: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The TWA model of a finished run: built from summary.json's ``model_spec``, its
    weights (BatchNorm recalibrated) loaded from ``model.pt``, in eval mode on ``device``.

    Raises FileNotFoundError naming a missing file, ValueError when summary.json has no
    ``model_spec`` or the weights do not fit the model.
    """
    from ..tasks.load import model_from_spec

    summary = read_summary(run_dir)
    spec = summary.get("model_spec")
    if not isinstance(spec, dict):
        raise ValueError(f"{store_fs.as_location(run_dir) / SUMMARY_FILE} has no model_spec (the model's name, arguments, classes "
                         f"and input shape): it was written by an older twa_ray; rebuild the model with "
                         f"twa_ray.models.build_model and load model.pt into it")
    model = model_from_spec(spec, f"{store_fs.as_location(run_dir) / SUMMARY_FILE} model_spec")
    try:
        model.load_state_dict(load_state_dict(run_dir))
    except RuntimeError as exc:  # missing / unexpected keys, shape mismatch
        raise ValueError(f"{store_fs.as_location(run_dir) / MODEL_FILE} does not fit the model of {spec}: {exc}") from None
    return model.to(device).eval()


def export_model(run_dir: str | Path, fmt: str, out: str | Path | None = None) -> Path:
    """Write the TWA model's state_dict as ``fmt`` ("safetensors" or "pt") to ``out``
    (default ``<run_dir>/model.<fmt>``); returns the path. The ``.pt`` default is model.pt
    itself, already a plain state_dict: it is returned as it is."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid: {list(EXPORT_FORMATS)}")
    run_dir = Path(run_dir)
    target = Path(out) if out is not None else run_dir / f"model.{fmt}"
    if target.suffix != f".{fmt}":
        raise ValueError(f"{target}: a {fmt} file must end in .{fmt}")
    if target.resolve() == (run_dir / MODEL_FILE).resolve():
        load_state_dict(run_dir)  # it exists and loads
        return target
    return Path(save_state_dict(load_state_dict(run_dir), target))
