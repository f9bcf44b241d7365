"""The parameter vector: a model's trainable parameters as one flat vector, in a fixed order.

Buffers (BatchNorm running statistics) are not part of the vector; they are handled
by BatchNorm recalibration (``update_bn``).
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Iterable, Mapping

import torch
from torch import nn


@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and offsets of the trainable parameters of a model.

    ``offsets[i]`` is where parameter ``names[i]`` starts in the flat vector of length
    ``num_params`` (D).
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def from_model(cls, model: nn.Module) -> "ParamLayout":
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model has no trainable parameters")
        return cls(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named))

    @property
    def numels(self) -> list[int]:
        return [prod(s) for s in self.shapes]

    @property
    def offsets(self) -> list[int]:
        out, pos = [], 0
        for m in self.numels:
            out.append(pos)
            pos += m
        return out

    @property
    def num_params(self) -> int:
        return sum(self.numels)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that make up the flat vector, in layout order."""
    return [p for p in model.parameters() if p.requires_grad]


def flatten_params(model: nn.Module) -> torch.Tensor:
    """Model trainable parameters -> (D,) float32 vector (a copy)."""
    return torch.cat([p.detach().reshape(-1).float() for p in trainable_parameters(model)])


def flatten_grads(model: nn.Module, out: torch.Tensor | None = None) -> torch.Tensor:
    """Model gradients -> (D,) vector; a missing gradient counts as zero."""
    params = trainable_parameters(model)
    if out is None:
        out = torch.empty(sum(p.numel() for p in params), device=params[0].device)
    pos = 0
    for p in params:
        m = p.numel()
        if p.grad is None:
            out[pos : pos + m].zero_()
        else:
            out[pos : pos + m].copy_(p.grad.reshape(-1))
        pos += m
    return out


@torch.no_grad()
def assign_flat(model: nn.Module, vector: torch.Tensor) -> None:
    """Write a (D,) vector into the model's trainable parameters (in place)."""
    params = trainable_parameters(model)
    total = sum(p.numel() for p in params)
    if vector.numel() != total:
        raise ValueError(f"vector has {vector.numel()} values, model has {total} trainable parameters")
    pos = 0
    for p in params:
        m = p.numel()
        p.copy_(vector[pos : pos + m].view_as(p))
        pos += m


def flatten_state(
    state: Mapping[str, torch.Tensor], layout: ParamLayout, source: str = "state_dict"
) -> torch.Tensor:
    """A state_dict (name -> tensor) -> (D,) float32 vector in ``layout`` order.

    Keys not in the layout (buffers) are ignored; a missing key, a shape mismatch or a
    non-finite value raises ValueError naming ``source`` and the key.
    """
    parts = []
    for name, shape in zip(layout.names, layout.shapes):
        if name not in state:
            raise ValueError(f"{source}: missing parameter {name!r}")
        t = state[name]
        if tuple(t.shape) != shape:
            raise ValueError(f"{source}: parameter {name!r} has shape {list(t.shape)}, expected {list(shape)}")
        t = t.detach().reshape(-1).float().cpu()
        if not torch.isfinite(t).all():
            raise ValueError(f"{source}: parameter {name!r} has non-finite values")
        parts.append(t)
    return torch.cat(parts)


def unflatten(vector: torch.Tensor, layout: ParamLayout) -> dict[str, torch.Tensor]:
    """(D,) vector -> {name: tensor of its shape} (views of ``vector``)."""
    return {
        n: vector[o : o + prod(s)].view(s)
        for n, s, o in zip(layout.names, layout.shapes, layout.offsets)
    }


def stack_flat(vectors: Iterable[torch.Tensor]) -> torch.Tensor:
    """List of (D,) vectors -> (n, D) float32 matrix."""
    return torch.stack([v.reshape(-1).float() for v in vectors])
