"""The contract of a projection kernel: one class per implementation of the two operations.

A kernel class is chosen once, when a ``Projection`` is built (``kernels.make_kernel``),
and one object of it is made for that projection: it may hold what it precomputes from
the projection's codes (its chunk plan, exact code sums). The projection is passed to
each call rather than held, so a kernel never keeps a projection's tensors alive.

Whether a kernel can run at all (a package that imports, a build that succeeds, a device
it supports) is asked of the class before an object is made; the answer is the process's
(a compiler, a driver, a package), so a class may keep it for the process and say why
not once (the subclasses document where and why).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch

from .chunks import centre_code

if TYPE_CHECKING:
    from ..projection import Projection


class Kernel(ABC):
    """Both operations of a packed projection Q (b < 32 bits; b = 32: the eager kernel).

    Subclasses set ``name`` (the registry key, a value of ``twa.kernel``) and implement
    ``coef_grad`` and ``reconstruct``; ``auto_devices``, ``check_device``, ``available``
    and ``create`` have defaults for a kernel that runs anywhere and cannot fail to build.
    """

    name: ClassVar[str]
    # device types on which ``auto`` picks this kernel where it is available (the first
    # registered one that lists the device; eager where none does)
    auto_devices: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def check_device(cls, device: torch.device) -> None:
        """Raise ValueError where the kernel, asked for by name, can never run on ``device``."""

    @classmethod
    def available(cls, device: torch.device) -> bool:
        """Whether it can run on ``device`` in this process; where not, the class has said
        why (one warning per process) and the projection runs the eager kernel."""
        return True

    @classmethod
    def create(cls, proj: "Projection") -> "Kernel":
        """The kernel object for ``proj`` (a kernel that can still fail to compile tries it
        here and returns the eager one instead)."""
        return cls(proj)

    def __init__(self, proj: "Projection") -> None:  # noqa: B027 - a kernel may precompute nothing
        """Precompute what the operations need from ``proj`` (not holding ``proj`` itself)."""

    @abstractmethod
    def coef_grad(self, proj: "Projection", g: torch.Tensor) -> torch.Tensor:
        """g (m,) float32, contiguous, on the data's device -> G (n, L_r) float32 = Q g per block."""

    @abstractmethod
    def reconstruct(self, proj: "Projection", x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x (n, L_r) float32 -> out (m,) = c + sum_i X_il Q_il per block, written in place
        and returned (b < 32: ``out`` is contiguous)."""


def middle(proj: "Projection") -> torch.Tensor:
    """(n, L_r) float64 offset + scale * 2^(b-1): Q = middle + scale * (codes - 2^(b-1))."""
    return proj.offset.double() + proj.scale.double() * centre_code(proj.bits)


def contiguous_data(proj: "Projection") -> torch.Tensor:
    return proj.data if proj.data.is_contiguous() else proj.data.contiguous()
