"""The native kernel: C++ on CPU tensors (``twa_ray.core.native``: compiled on first use
and cached), on a whole run of blocks at once.

Codes are unpacked in registers, a tile of the centred gradient is reused by several
candidate rows, and products are added in float32 over tiles of at most SUM_PIECE of
them, tiles in float64. It centres g per tile rather than per block (the tile's mean
times its exact code sums, in float64, restores <codes - 2^(b-1), g>), so g is read once,
with no pass for block means first; results match eager to float32 rounding.

Whether it builds is decided once per process by the loader (``native.load()``: the
compiled module is a process's, like an imported one; it builds or loads it on first use
and, where it cannot, says why in one warning); where not, a projection asking for
``native`` gets the eager kernel when it is built.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .. import native
from .base import Kernel, contiguous_data, middle

if TYPE_CHECKING:
    from ..projection import Projection


class NativeKernel(Kernel):
    """The C++ kernels; the per-tile code sums its coef_grad needs are made on first use."""

    name = "native"
    auto_devices = ("cpu",)

    @classmethod
    def check_device(cls, device: torch.device) -> None:
        if device.type != "cpu":
            raise ValueError(f"kernel 'native' runs on CPU tensors, not {device.type} ones: "
                             "use 'auto', 'eager' or 'triton'")

    @classmethod
    def available(cls, device: torch.device) -> bool:
        return native.available()  # native.load() warned once where it is not

    def __init__(self, proj: "Projection") -> None:
        self.bits = proj.bits
        self.sizes = torch.tensor(proj.sizes, dtype=torch.int64, device="cpu")  # the C++ code's block sizes
        self._code_sums: torch.Tensor | None = None  # (tiles, n) int32, made on first use

    def coef_grad(self, proj: "Projection", g: torch.Tensor) -> torch.Tensor:
        """<codes - 2^(b-1), g> centred per tile, and sum(g), in C++; then
        G = scale * dot + middle * sum(g)."""
        scale, mid = proj.scale.double(), middle(proj)
        data = contiguous_data(proj)
        if self._code_sums is None:
            self._code_sums = native.code_sums(data, self.sizes, self.bits)
        dot, g_sum = native.coef_grad(data, g, self.sizes, self._code_sums, self.bits)
        return (scale * dot + mid * g_sum).float()

    def reconstruct(self, proj: "Projection", x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """On centred codes: Q = middle + scale * (codes - 2^(b-1))."""
        weights = (x * proj.scale).t().contiguous()  # (L_r, n)
        base = (x.double() * middle(proj)).sum(dim=0).float()  # (L_r,)
        return native.reconstruct(contiguous_data(proj), weights, base, proj.center.contiguous(),
                                  self.sizes, self.bits, out)
