"""The projection Q[:, S] of one run of blocks, stored packed, and its two operations.

For candidates i = 1..n and the local blocks l of this run (sizes m_l, sum m):

    coef_grad:   G[i, l] = < Q_il , g[B_l] >                 g (m,) -> G (n, L)
    reconstruct: w[B_l]  = c[B_l] + sum_i X[i, l] * Q_il      X (n, L) -> w (m,)

With b < 32 bits, Q_il = offset_il + scale_il * codes_il and the codes of each
(candidate, block) are packed into ceil(m_l * b / 8) bytes, blocks one after another;
so the kernels only ever work on codes. Written as ``scale * <codes, g> + offset * sum(g)``
the coefficient gradient's two terms are large and nearly cancel whenever g has a mean
(the codes are non-negative), losing digits in float32. So ``coef_grad`` centres both:
with gc = g[B_l] - mean_l (as rounded in float32) and h = 2^(b-1),

    G[i, l] = scale_il * < codes_il - h , gc > + (offset_il + scale_il * h) * sum(gc)
              + sum(Q_il) * mean_l,

where sum(Q_il) (n, L) is precomputed exactly in float64, and the dot products add float32
products over at most SUM_PIECE columns, then go on in float64. (b = 32: float64 sums of
the pieces of <Q_il, g>; the stored directions are not one-signed.)

The two operations run in a kernel object (``twa_ray.core.kernels``: ``eager``,
``native``, ``triton``, by the config key ``twa.kernel``), chosen once when the projection
is built: ``auto`` (the default) by the data's device and what is available. A kernel
asked for on a device it cannot run on raises ValueError. Every tensor is made on the
data's device.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .kernels import AUTO, Kernel, kernel_names, make_kernel, resolve_kernel
from .kernels.chunks import SUM_PIECE
from .quant import check_bits, dequantize, pack_bits, packed_bytes, quantize, unpack_bits
from .subspace import RAW_BASES, block_coords, build_basis, check_start, start_point

DEFAULT_CHUNK_BYTES = 8 << 20
# The values of ``twa.kernel`` ("auto" and the registered kernels), under the name config.py,
# benchmarks/projection.py and tests/gpu import; the registry is ``twa_ray.core.kernels.KERNELS``.
KERNELS = kernel_names()

__all__ = ["DEFAULT_CHUNK_BYTES", "KERNELS", "SUM_PIECE", "Projection", "build_projection", "resolve_kernel"]


class Projection:
    """Q[:, S] and c[S] for one run of blocks, with the two projection operations.

    Attributes:
        bits: 1, 2, 4, 8 or 32.
        sizes: block sizes m_l of this run (L_r blocks, sum m).
        center: (m,) float32.
        data: (n, sum_l ceil(m_l*b/8)) uint8 for b < 32, else (n, m) float32.
        scale, offset: (n, L_r) float32 (b < 32 only; None for 32).
        kernel: the kernel asked for, "auto" or a name in ``twa_ray.core.kernels.KERNELS``.
            Setting it chooses again, once (not on every call).
        kernel_impl: the ``Kernel`` object that runs, chosen for ``kernel`` on the data's
            device and bits when the projection is built; its ``name`` says which.
        start: (n, L_r) float32, the coefficients X starts from on these blocks (None: 0).
        basis_name: the basis Q was built as (``twa_ray.core.subspace.BASES``; None: built
            elsewhere, treated as a journal basis). It says where weight decay acts.
    """

    def __init__(
        self,
        center: torch.Tensor,
        data: torch.Tensor,
        sizes: Sequence[int],
        bits: int,
        scale: torch.Tensor | None = None,
        offset: torch.Tensor | None = None,
        max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        kernel: str | None = None,
        *,
        start: torch.Tensor | None = None,
        basis_name: str | None = None,
    ) -> None:
        self.bits = check_bits(bits)
        self.sizes = list(sizes)
        self.center = center
        self.start = start
        self.basis_name = basis_name
        self.data = data
        self.scale = scale
        self.offset = offset
        self.n = data.shape[0]
        self.max_chunk_bytes = max_chunk_bytes
        self.kernel = kernel or AUTO

    @property
    def kernel(self) -> str:
        return self._kernel

    @kernel.setter
    def kernel(self, name: str) -> None:
        self.kernel_impl: Kernel = make_kernel(name, self)  # ValueError for a name it cannot run
        self._kernel = name

    @classmethod
    def from_basis(
        cls,
        center: torch.Tensor,
        basis: torch.Tensor,
        sizes: Sequence[int],
        bits: int,
        max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        kernel: str | None = None,
        bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
        **meta,
    ) -> "Projection":
        """Quantise and pack a float basis (n, m) per (candidate, block); ``meta``: start, basis_name.

        ``bounds`` = (lo, hi), each (n, L_r): every (candidate, block)'s quantisation range when
        the basis holds only part of each block (a rank's rows under FSDP, ``core.row_shards``)."""
        check_bits(bits)
        if bits == 32:
            return cls(center, basis.float().contiguous(), sizes, 32, max_chunk_bytes=max_chunk_bytes, kernel=kernel,
                       **meta)
        n = basis.shape[0]
        parts, scales, offsets, pos = [], [], [], 0
        for l, m in enumerate(sizes):
            part_bounds = None if bounds is None else (bounds[0][:, l], bounds[1][:, l])
            codes, scale, offset = quantize(basis[:, pos : pos + m], bits, part_bounds)
            parts.append(pack_bits(codes, bits))
            scales.append(scale)
            offsets.append(offset)
            pos += m
        dev = basis.device
        data = torch.cat(parts, dim=1) if parts else torch.zeros(n, 0, dtype=torch.uint8, device=dev)
        return cls(
            center,
            data.contiguous(),
            sizes,
            bits,
            torch.stack(scales, dim=1) if scales else torch.zeros(n, 0, device=dev),
            torch.stack(offsets, dim=1) if offsets else torch.zeros(n, 0, device=dev),
            max_chunk_bytes,
            kernel,
            **meta,
        )

    @property
    def num_blocks(self) -> int:
        return len(self.sizes)

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored projection (codes or floats; scale/offset not counted)."""
        return self.data.numel() * self.data.element_size()

    def to(self, device) -> "Projection":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Projection(
            self.center.to(device), self.data.to(device), self.sizes, self.bits,
            move(self.scale), move(self.offset), self.max_chunk_bytes, self.kernel,
            start=move(self.start), basis_name=self.basis_name,
        )

    def dequantized(self) -> torch.Tensor:
        """The float basis (n, m) this projection stands for (a reference: n x m floats)."""
        out = torch.empty(self.n, self.numel, device=self.data.device)
        pos = col = 0
        for l, m in enumerate(self.sizes):
            if self.bits == 32:
                out[:, pos : pos + m] = self.data[:, pos : pos + m]
            else:
                nb = packed_bytes(m, self.bits)
                codes = unpack_bits(self.data[:, col : col + nb], self.bits, m)
                out[:, pos : pos + m] = dequantize(codes, self.scale[:, l], self.offset[:, l])
                col += nb
            pos += m
        return out

    # ------------------------------------------------------------ the two operations

    def coef_grad(self, g: torch.Tensor) -> torch.Tensor:
        """Gradient slice g (m,) -> coefficient gradient G (n, L_r) = Q g per block.

        Float32 products, float64 sums of pieces and of the terms; b < 32 on the centred
        gradient and codes (the module docstring says why and how).
        """
        g = g.to(self.data.device, torch.float32).contiguous()
        return self.kernel_impl.coef_grad(self, g)

    def reconstruct(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Coefficients X (n, L_r) -> weights w (m,) = c + sum_i X_il Q_il per block."""
        x = x.to(self.data.device, torch.float32)
        if out is None:
            out = torch.empty_like(self.center)
        if self.bits < 32 and not out.is_contiguous():  # the packed kernels view slices of w as (bytes, per)
            return out.copy_(self.reconstruct(x))
        return self.kernel_impl.reconstruct(self, x, out)


def build_projection(
    candidates: torch.Tensor,
    sizes: Sequence[int],
    basis: str,
    bits: int,
    all_reduce=None,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    center: torch.Tensor | None = None,
    kernel: str | None = None,
    start: str | int = "mean",
) -> Projection:
    """Candidates (n, m) for a run of blocks -> its Projection. ``candidates`` is overwritten.

    Journal bases: ``all_reduce`` and ``center`` are passed to ``build_basis``; X starts at
    0 (the center), so ``start`` must be "mean".

    ``checkpoints`` (ICLR'23): Q spans the raw candidates and X starts at X0 with
    w(X0) = s, the start point: ``center`` (m,) when given (the previous round's solution),
    else the mean, the last or candidate ``start`` (``subspace.start_point``). X0 = U s per
    block (U the float basis: at b = 32, w(X) = U^T X, the paper's parametrisation), and the
    stored center is c' = s - Q^T X0, so that

        w(X) = c' + Q^T X,      w(X0) = s exactly (up to float32 rounding).

    c' is s's part outside the span (0 for a candidate or the mean) plus, for b < 32, the
    quantisation error of Q^T X0, which so never reaches the start point; weights then
    move by Q^T (X - X0), as with the journal bases.
    """
    if basis not in RAW_BASES:
        if start != "mean":
            raise ValueError(f"start {start!r}: the {basis!r} basis (the journal algorithm) starts at the mean "
                             f"(X = 0); other start points need basis 'checkpoints'")
        center, u = build_basis(candidates, sizes, basis, all_reduce, center)
        return Projection.from_basis(center, u, sizes, bits, max_chunk_bytes, kernel, basis_name=basis)
    check_start(start, candidates.shape[0])
    s = start_point(candidates, start) if center is None else center.to(candidates.device, torch.float32).clone()
    zero, u = build_basis(candidates, sizes, basis)
    x0 = block_coords(u, s, sizes).float()  # (n, L_r)
    proj = Projection.from_basis(zero, u, sizes, bits, max_chunk_bytes, kernel, start=x0, basis_name=basis)
    proj.center = s - proj.reconstruct(x0)  # reconstruct with a zero center: Q^T X0
    return proj
