"""The projection Q[:, S] of one run of blocks, stored packed, and its two kernels.

For candidates i = 1..n and the local blocks l of this run (sizes m_l, sum m):

    coef_grad:   G[i, l] = < Q_il , g[B_l] >                 g (m,) -> G (n, L)
    reconstruct: w[B_l]  = c[B_l] + sum_i X[i, l] * Q_il      X (n, L) -> w (m,)

With b < 32 bits, Q_il = offset_il + scale_il * codes_il and the codes of each
(candidate, block) are packed into ceil(m_l * b / 8) bytes, blocks one after another.
Kernels stream the packed bytes in chunks, so temporary memory is bounded by
``max_chunk_bytes`` and not by D. They run wherever the tensors live (CPU or CUDA).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .quant import check_bits, dequantize, pack_bits, packed_bytes, quantize, unpack_bits
from .subspace import build_basis

DEFAULT_CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class _Chunk:
    """Elements [start, end) of the run, stored in data columns [col_start, col_end).

    ``block`` is set when the chunk lies in one block; otherwise ``seg`` (end-start,)
    gives each element's local block and ``keep`` the positions of real (non padding)
    codes among the unpacked ones.
    """

    start: int
    end: int
    col_start: int
    col_end: int
    block: int | None
    seg: torch.Tensor | None
    keep: torch.Tensor | None


def _plan_chunks(sizes: Sequence[int], bits: int, chunk_elems: int, device) -> list[_Chunk]:
    """Cut the run into chunks of at most ``chunk_elems`` elements (a multiple of 8).

    A large block is cut into pieces; small neighbouring blocks share a chunk.
    """
    per_col = 1 if bits == 32 else 8 // bits  # elements per data column
    starts, cols, pos, col = [], [], 0, 0
    for m in sizes:
        starts.append(pos)
        cols.append(col)
        pos += m
        col += m if bits == 32 else packed_bytes(m, bits)
    starts.append(pos)
    cols.append(col)

    chunks: list[_Chunk] = []
    group: list[int] = []

    def flush() -> None:
        if not group:
            return
        l0, l1 = group[0], group[-1] + 1
        if len(group) == 1:
            chunks.append(_Chunk(starts[l0], starts[l1], cols[l0], cols[l1], l0, None, None))
        else:
            seg = torch.cat([torch.full((sizes[l],), l, dtype=torch.long) for l in group])
            keep = torch.cat(
                [torch.arange(sizes[l]) + (cols[l] - cols[l0]) * per_col for l in group]
            )
            chunks.append(
                _Chunk(starts[l0], starts[l1], cols[l0], cols[l1], None, seg.to(device), keep.to(device))
            )
        group.clear()

    group_elems = 0
    for l, m in enumerate(sizes):
        if m == 0:
            continue
        if m >= chunk_elems:
            flush()
            group_elems = 0
            for a in range(0, m, chunk_elems):
                b = min(m, a + chunk_elems)
                col_a = cols[l] + (a if bits == 32 else a // per_col)
                col_b = cols[l] + (b if bits == 32 else packed_bytes(b, bits))
                chunks.append(_Chunk(starts[l] + a, starts[l] + b, col_a, col_b, l, None, None))
            continue
        if group_elems + m > chunk_elems:
            flush()
            group_elems = 0
        group.append(l)
        group_elems += m
    flush()
    return chunks


class Projection:
    """Q[:, S] and c[S] for one run of blocks, with the two projection kernels.

    Attributes:
        bits: 1, 2, 4, 8 or 32.
        sizes: block sizes m_l of this run (L_r blocks, sum m).
        center: (m,) float32.
        data: (n, sum_l ceil(m_l*b/8)) uint8 for b < 32, else (n, m) float32.
        scale, offset: (n, L_r) float32 (b < 32 only; None for 32).
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
    ) -> None:
        self.bits = check_bits(bits)
        self.sizes = list(sizes)
        self.center = center
        self.data = data
        self.scale = scale
        self.offset = offset
        self.n = data.shape[0]
        self.max_chunk_bytes = max_chunk_bytes
        # float32 codes of one chunk: n * chunk_elems * 4 bytes <= max_chunk_bytes
        chunk_elems = max(64, (max_chunk_bytes // (4 * max(1, self.n))) // 64 * 64)
        self._chunks = _plan_chunks(self.sizes, bits, chunk_elems, data.device)

    @classmethod
    def from_basis(
        cls,
        center: torch.Tensor,
        basis: torch.Tensor,
        sizes: Sequence[int],
        bits: int,
        max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    ) -> "Projection":
        """Quantise and pack a float basis (n, m) per (candidate, block)."""
        check_bits(bits)
        if bits == 32:
            return cls(center, basis.float().contiguous(), sizes, 32, max_chunk_bytes=max_chunk_bytes)
        n = basis.shape[0]
        parts, scales, offsets, pos = [], [], [], 0
        for m in sizes:
            codes, scale, offset = quantize(basis[:, pos : pos + m], bits)
            parts.append(pack_bits(codes, bits))
            scales.append(scale)
            offsets.append(offset)
            pos += m
        data = torch.cat(parts, dim=1) if parts else torch.zeros(n, 0, dtype=torch.uint8)
        return cls(
            center,
            data.contiguous(),
            sizes,
            bits,
            torch.stack(scales, dim=1) if scales else torch.zeros(n, 0),
            torch.stack(offsets, dim=1) if offsets else torch.zeros(n, 0),
            max_chunk_bytes,
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
            move(self.scale), move(self.offset), self.max_chunk_bytes,
        )

    def _codes(self, ch: _Chunk) -> torch.Tensor:
        """Float values (n, end-start) of a chunk: codes for b < 32, the basis for b = 32."""
        raw = self.data[:, ch.col_start : ch.col_end]
        if self.bits == 32:
            return raw
        codes = unpack_bits(raw, self.bits)
        codes = codes[:, ch.keep] if ch.keep is not None else codes[:, : ch.end - ch.start]
        return codes.float()

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

    def coef_grad(self, g: torch.Tensor) -> torch.Tensor:
        """Gradient slice g (m,) -> coefficient gradient G (n, L_r) = Q g per block."""
        g = g.to(self.data.device, torch.float32)
        dot = torch.zeros(self.n, self.num_blocks, device=g.device)
        gsum = torch.zeros(self.num_blocks, device=g.device)
        for ch in self._chunks:
            vals = self._codes(ch)  # (n, s)
            gc = g[ch.start : ch.end]  # (s,)
            if ch.block is not None:
                dot[:, ch.block] += vals @ gc
                gsum[ch.block] += gc.sum()
            else:
                dot.index_add_(1, ch.seg, vals * gc)
                gsum.index_add_(0, ch.seg, gc)
        if self.bits == 32:
            return dot
        return self.scale * dot + self.offset * gsum

    def reconstruct(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Coefficients X (n, L_r) -> weights w (m,) = c + sum_i X_il Q_il per block."""
        x = x.to(self.data.device, torch.float32)
        if out is None:
            out = torch.empty_like(self.center)
        out.copy_(self.center)
        if self.bits == 32:
            weights, base = x, None
        else:
            weights = x * self.scale  # (n, L_r)
            base = (x * self.offset).sum(dim=0)  # (L_r,)
        for ch in self._chunks:
            vals = self._codes(ch)  # (n, s)
            dst = out[ch.start : ch.end]
            if ch.block is not None:
                dst += weights[:, ch.block] @ vals
                if base is not None:
                    dst += base[ch.block]
            else:
                dst += (weights[:, ch.seg] * vals).sum(dim=0)
                if base is not None:
                    dst += base[ch.seg]
        return out


def build_projection(
    candidates: torch.Tensor,
    sizes: Sequence[int],
    basis: str,
    bits: int,
    all_reduce=None,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    center: torch.Tensor | None = None,
) -> Projection:
    """Candidates (n, m) for a run of blocks -> its Projection. ``candidates`` is overwritten.

    ``all_reduce`` and ``center`` are passed to ``build_basis``.
    """
    center, u = build_basis(candidates, sizes, basis, all_reduce, center)
    return Projection.from_basis(center, u, sizes, bits, max_chunk_bytes)
