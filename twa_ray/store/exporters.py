"""Export a result (TWA, SWA, a soup, a candidate) as a plain state_dict: ``.pt`` or ``.safetensors``.

    from twa_ray.store import export_state_dict, state_dict_from_vector
    state = state_dict_from_vector(weights, model)        # weights: (D,) flat vector
    export_state_dict(state, "runs/soup/models/twa")      # -> twa.pt and twa.safetensors

The files load without twa_ray: ``torch.load(path, weights_only=True)`` or
``safetensors.torch.load_file(path)``, then ``model.load_state_dict(...)``. Each file is
written to a temporary name and moved into place (a local path or any pyarrow URI).
"""
from __future__ import annotations

import io
import os
import posixpath
from typing import Mapping, Sequence

import torch
from torch import nn

from ..core.params import ParamLayout, unflatten
from . import fs as _fs

__all__ = ["EXPORT_FORMATS", "export_state_dict", "save_state_dict", "state_dict_from_vector"]

EXPORT_FORMATS = ("pt", "safetensors")


def state_dict_from_vector(vector: torch.Tensor, model: nn.Module) -> dict[str, torch.Tensor]:
    """A full state_dict of ``model`` with its trainable parameters taken from ``vector``.

    Args:
        vector: (D,) flat parameters in ``ParamLayout.from_model(model)`` order.
        model: supplies the layout, the parameters' dtypes and the buffers (e.g.
            BatchNorm statistics; recalibrate them for these weights first). Not modified.

    Returns:
        name -> independent CPU tensor, in ``model.state_dict()`` order.
    """
    layout = ParamLayout.from_model(model)
    if vector.numel() != layout.num_params:
        raise ValueError(f"vector has {vector.numel()} values, the model has {layout.num_params} trainable parameters")
    params = unflatten(vector.detach().reshape(-1).cpu(), layout)
    return {
        name: (params[name].to(value.dtype) if name in params else value.detach().cpu()).clone()
        for name, value in model.state_dict().items()
    }


def _serialise(state: Mapping[str, torch.Tensor], fmt: str) -> bytes:
    tensors = {str(k): v.detach().cpu().contiguous().clone() for k, v in state.items()}  # no shared storage
    if fmt == "safetensors":
        from safetensors.torch import save

        return save(tensors, metadata={"format": "pt"})
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return buffer.getvalue()


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | os.PathLike) -> str:
    """Write ``state`` (name -> tensor) to ``path``; the suffix ``.pt`` / ``.safetensors`` picks the format.

    Atomic: written to a temporary name beside ``path``, then moved into place. Returns
    the path (absolute for local paths).
    """
    path = os.fspath(path)
    name = posixpath.basename(_fs.strip_query(path))
    fmt = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"{path}: the suffix must be one of {['.' + f for f in EXPORT_FORMATS]}")
    if not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TypeError(f"{path}: state must be a non-empty dict of tensors")
    return _fs.write_file(path, _serialise(state, fmt))


def export_state_dict(
    state: Mapping[str, torch.Tensor], base: str | os.PathLike, formats: Sequence[str] = EXPORT_FORMATS,
) -> list[str]:
    """Write ``state`` as ``<base>.pt`` and/or ``<base>.safetensors``; returns the paths written."""
    unknown = [f for f in formats if f not in EXPORT_FORMATS]
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; valid: {list(EXPORT_FORMATS)}")
    return [save_state_dict(state, _fs.with_suffix(base, f".{fmt}")) for fmt in formats]
