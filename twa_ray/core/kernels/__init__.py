"""The projection's kernels: implementations of its two operations on packed codes,
behind a registry (name -> class), chosen once when a ``Projection`` is built.

``KERNELS`` holds them by the name the config key ``twa.kernel`` gives:

- ``eager`` (``EagerKernel``): chunked torch operations, on any device; the reference
  the others are tested against, and the float kernels of b = 32 (every name runs eager
  at 32 bits).
- ``native`` (``NativeKernel``): C++ on CPU tensors, a whole run of blocks at once.
  Where it cannot be built (no compiler), one warning and eager.
- ``triton`` (``TritonKernel``): Triton chunk kernels on CUDA tensors (CPU ones under the
  Triton interpreter, for tests). Opt-in: not yet measured on a GPU. Without the triton
  package, or if a kernel fails, one warning and eager.

``auto`` (the default) picks, by the data's device and what is available: native on CPU
tensors where it builds, else eager; eager on CUDA tensors until the Triton kernels are
measured on a GPU. A kernel asked for on a device it cannot run on raises ValueError, as
does a name that is neither ``auto`` nor registered.

Adding a kernel is one class (a ``Kernel`` subclass, its own module) and its entry in
``KERNELS``; ``Projection`` calls the object and never branches on its name.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .base import Kernel
from .eager import EagerKernel
from .native import NativeKernel
from .triton import TritonKernel

if TYPE_CHECKING:
    from ..projection import Projection

AUTO = "auto"
KERNELS: dict[str, type[Kernel]] = {
    "eager": EagerKernel,
    "native": NativeKernel,
    "triton": TritonKernel,
}


def kernel_names() -> tuple[str, ...]:
    """The values ``twa.kernel`` takes: "auto" and the registered kernels."""
    return (AUTO, *KERNELS)


def check_kernel_name(name: str) -> str:
    """``name``, or a ValueError naming the key ``twa.kernel`` and the valid values."""
    if name != AUTO and name not in KERNELS:
        raise ValueError(f"twa.kernel: {name!r} is not one of {list(kernel_names())}")
    return name


def kernel_class(name: str, device: torch.device | str, bits: int) -> type[Kernel]:
    """The kernel class that runs for ``name`` on tensors of ``device`` at ``bits`` (the
    module docstring says how ``auto`` and the fallbacks choose).

    Raises ValueError for an unknown name, or one asked for on a device it cannot run on.
    """
    check_kernel_name(name)
    device = torch.device(device)
    if bits == 32:  # float directions: the eager float kernels
        return EagerKernel
    if name == AUTO:
        for cls in KERNELS.values():
            if device.type in cls.auto_devices and cls.available(device):
                return cls
        return EagerKernel
    cls = KERNELS[name]
    cls.check_device(device)
    return cls if cls.available(device) else EagerKernel  # where not, the class said why


def resolve_kernel(name: str, device: torch.device | str, bits: int) -> str:
    """The name of the kernel that runs for ``name`` on ``device`` at ``bits``."""
    return kernel_class(name, device, bits).name


def make_kernel(name: str, proj: "Projection") -> Kernel:
    """The kernel object for ``proj``, chosen for its data's device and bits."""
    return kernel_class(name, proj.data.device, proj.bits).create(proj)


__all__ = ["AUTO", "KERNELS", "Kernel", "EagerKernel", "NativeKernel", "TritonKernel", "kernel_names",
           "check_kernel_name", "kernel_class", "resolve_kernel", "make_kernel"]
