"""The projection Q[:, S] of one run of blocks, stored packed, and its two kernels.

For candidates i = 1..n and the local blocks l of this run (sizes m_l, sum m):

    coef_grad:   G[i, l] = < Q_il , g[B_l] >                 g (m,) -> G (n, L)
    reconstruct: w[B_l]  = c[B_l] + sum_i X[i, l] * Q_il      X (n, L) -> w (m,)

With b < 32 bits, Q_il = offset_il + scale_il * codes_il and the codes of each
(candidate, block) are packed into ceil(m_l * b / 8) bytes, blocks one after another;
so G = scale * <codes, g> + offset * sum(g), and the kernels only ever work on codes.

Kernels stream the packed bytes in chunks (bounded by ``max_chunk_bytes``), so
temporary memory does not grow with D. A byte holds per = 8/b codes; one broadcast
``bytes & ((2^b - 1) << k*b)`` isolates code k of every byte as code_k * 2^(k*b),
laid out (n, per, bytes), and one copy turns the chunk to floats. The powers of two
are folded, exactly, into the de-interleaved gradient (coef_grad) or the result
(reconstruct), so each chunk is one mask, one conversion and one matrix-vector product.
(On the 2-core CPU of the benchmarks: 4-7x the earlier unpack-then-dot at 1-4 bits; see
benchmarks/RESULTS.md.)

``kernel="compiled"`` fuses the per-chunk unpack-and-dot with ``torch.compile`` (no
float copy of the codes). It is meant for GPUs (one Triton kernel per chunk; not yet
measured there); on that CPU it matched eager at 4 bits and was up to 1.7x faster at
1-2 bits, after a 10-25 s first compile. Any compile or run failure falls back to the
eager kernels with one warning. Default: ``eager``, or the environment variable
``TWA_RAY_PROJECTION_KERNEL``. Kernels run wherever the tensors live (CPU or CUDA).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .quant import check_bits, dequantize, pack_bits, packed_bytes, quantize, unpack_bits
from .subspace import build_basis

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 8 << 20
# Float codes of one chunk (b < 32) stay within this many bytes (and max_chunk_bytes):
# they are read back from the last-level cache. Measured on the benchmark CPU: chunks
# fitting L2 (1 MiB) lost more to per-operation overhead than they gained.
CACHE_CHUNK_BYTES = 4 << 20
KERNELS = ("eager", "compiled")
KERNEL_ENV = "TWA_RAY_PROJECTION_KERNEL"


def _default_kernel() -> str:
    kernel = os.environ.get(KERNEL_ENV, "eager") or "eager"
    if kernel not in KERNELS:
        raise ValueError(f"{KERNEL_ENV}={kernel!r} is not one of {list(KERNELS)}")
    return kernel


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


# ---------------------------------------------------------------- fused chunk kernels (torch.compile)

_COMPILED: dict[tuple[str, int], Callable] = {}
_COMPILE_FAILED = False


def _fused_grad(bits: int) -> Callable:
    """(raw (n, B) uint8, gt (per, B) float: de-interleaved, 2^-kb scaled) -> (n,) dot products."""
    masks = [((1 << bits) - 1) << (k * bits) for k in range(8 // bits)]

    def kernel(raw: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        acc = (raw & masks[0]).to(torch.float32) * gt[0]
        for k in range(1, len(masks)):
            acc = acc + (raw & masks[k]).to(torch.float32) * gt[k]
        return acc.sum(dim=1)

    return kernel


def _fused_reconstruct(bits: int) -> Callable:
    """(raw (n, B) uint8, w (n,)) -> (per, B): sum_i w_i * code_k(byte j) * 2^(k*b)."""
    masks = [((1 << bits) - 1) << (k * bits) for k in range(8 // bits)]

    def kernel(raw: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.stack([((raw & m).to(torch.float32) * w[:, None]).sum(dim=0) for m in masks])

    return kernel


def _compiled(kind: str, bits: int) -> Callable:
    """The torch.compile'd chunk kernel (compiled lazily, on its first call)."""
    key = (kind, bits)
    if key not in _COMPILED:
        make = _fused_grad if kind == "grad" else _fused_reconstruct
        _COMPILED[key] = torch.compile(make(bits), dynamic=True)
    return _COMPILED[key]


def _compile_failed(exc: BaseException) -> None:
    global _COMPILE_FAILED
    if not _COMPILE_FAILED:
        log.warning("torch.compile of the projection kernels failed (%s: %s); using the eager kernels",
                    type(exc).__name__, exc)
    _COMPILE_FAILED = True


class Projection:
    """Q[:, S] and c[S] for one run of blocks, with the two projection kernels.

    Attributes:
        bits: 1, 2, 4, 8 or 32.
        sizes: block sizes m_l of this run (L_r blocks, sum m).
        center: (m,) float32.
        data: (n, sum_l ceil(m_l*b/8)) uint8 for b < 32, else (n, m) float32.
        scale, offset: (n, L_r) float32 (b < 32 only; None for 32).
        kernel: "eager" or "compiled" (see the module docstring); may be changed any time.
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
    ) -> None:
        self.bits = check_bits(bits)
        self.sizes = list(sizes)
        self.center = center
        self.data = data
        self.scale = scale
        self.offset = offset
        self.n = data.shape[0]
        self.max_chunk_bytes = max_chunk_bytes
        self.kernel = kernel or _default_kernel()
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel={self.kernel!r} is not one of {list(KERNELS)}")
        # float32 codes of one chunk: n * chunk_elems * 4 bytes <= the chunk budget (b < 32:
        # also within the cache budget; b = 32 streams the stored floats, no temporary)
        budget = max_chunk_bytes if bits == 32 else min(max_chunk_bytes, CACHE_CHUNK_BYTES)
        chunk_elems = max(64, (budget // (4 * max(1, self.n))) // 64 * 64)
        self._chunks = _plan_chunks(self.sizes, bits, chunk_elems, data.device)
        self._max_cols = max((ch.col_end - ch.col_start for ch in self._chunks), default=0)
        self._single = [ch for ch in self._chunks if ch.block is not None]
        self._grouped = [ch for ch in self._chunks if ch.block is None]
        self._single_runs: list[tuple[int, int, int]] = []  # (block, first, end) over self._single
        for c, ch in enumerate(self._single):
            if self._single_runs and self._single_runs[-1][0] == ch.block:
                self._single_runs[-1] = (ch.block, self._single_runs[-1][1], c + 1)
            else:
                self._single_runs.append((ch.block, c, c + 1))
        if bits < 32:
            per = 8 // bits
            masks = [((1 << bits) - 1) << (k * bits) for k in range(per)]
            self._masks = torch.tensor(masks, dtype=torch.uint8, device=data.device).view(1, per, 1)
            # code k is read as code * 2^(k*b): these exact powers of two undo it
            self._inv = torch.tensor([2.0 ** (-k * bits) for k in range(per)], device=data.device).view(per, 1)

    @classmethod
    def from_basis(
        cls,
        center: torch.Tensor,
        basis: torch.Tensor,
        sizes: Sequence[int],
        bits: int,
        max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        kernel: str | None = None,
    ) -> "Projection":
        """Quantise and pack a float basis (n, m) per (candidate, block)."""
        check_bits(bits)
        if bits == 32:
            return cls(center, basis.float().contiguous(), sizes, 32, max_chunk_bytes=max_chunk_bytes, kernel=kernel)
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
            kernel,
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

    # ------------------------------------------------------------ chunk helpers (b < 32)

    def _workspace(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Buffers for one call: float codes and masked bytes (n*per*B each), a (per*B) vector."""
        per, cols, dev = 8 // self.bits, self._max_cols, self.data.device
        return (
            torch.empty(self.n * per * cols, device=dev),
            torch.empty(self.n * per * cols if per > 1 else 0, dtype=torch.uint8, device=dev),
            torch.empty(per * cols, device=dev),
        )

    def _unpack(self, raw: torch.Tensor, work) -> torch.Tensor:
        """Packed bytes raw (n, B) -> (n, per, B) float: code k of byte j times 2^(k*b)."""
        per, cols = 8 // self.bits, raw.shape[1]
        out = work[0][: self.n * per * cols].view(self.n, per, cols)
        if per == 1:
            out[:, 0].copy_(raw)
            return out
        masked = work[1][: self.n * per * cols].view(self.n, per, cols)
        torch.bitwise_and(raw.unsqueeze(1), self._masks, out=masked)  # every code k in one pass
        out.copy_(masked)
        return out

    def _deinterleave(self, g: torch.Tensor, work) -> torch.Tensor:
        """g (s,) -> (per, B) with [k, j] = g[j*per + k] * 2^(-k*b), zero past the end."""
        per = 8 // self.bits
        s = g.shape[0]
        cols = -(-s // per)
        gt = work[2][: per * cols].view(per, cols)
        full = s // per
        if full:
            torch.mul(g[: full * per].view(full, per).t(), self._inv, out=gt[:, :full])
        if full < cols:
            gt[:, full].zero_()
            r = s - full * per
            gt[:r, full] = g[full * per :] * self._inv[:r, 0]
        return gt

    def _float_codes(self, ch: _Chunk, work) -> torch.Tensor:
        """Float codes (n, end-start) of a chunk of several small blocks (b < 32)."""
        raw = self.data[:, ch.col_start : ch.col_end]
        per, cols = 8 // self.bits, raw.shape[1]
        scaled = self._unpack(raw, work)  # (n, per, B)
        vals = (scaled * self._inv).transpose(1, 2).reshape(self.n, cols * per)
        return vals[:, ch.keep]

    def _use_compiled(self) -> bool:
        return self.kernel == "compiled" and not _COMPILE_FAILED

    def _chunk_dot(self, raw: torch.Tensor, gc: torch.Tensor, out: torch.Tensor, work) -> None:
        """out (n,) = <codes, g> per candidate for one single-block chunk: raw (n, B), gc (s,)."""
        if self.bits == 8:
            codes = work[0][: raw.numel()].view(raw.shape)
            codes.copy_(raw)
            torch.mv(codes, gc, out=out)
            return
        gt = self._deinterleave(gc, work)  # (per, B), scaled by 2^(-k*b)
        if self._use_compiled():
            try:
                out.copy_(_compiled("grad", self.bits)(raw, gt))
                return
            except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back
                _compile_failed(exc)
        scaled = self._unpack(raw, work)  # (n, per, B)
        torch.mv(scaled.view(self.n, -1), gt.view(-1), out=out)

    def _chunk_combine(self, raw: torch.Tensor, w: torch.Tensor, dst: torch.Tensor, work) -> None:
        """dst (s,) += sum_i w_i * codes_i for one single-block chunk."""
        if self.bits == 8:
            codes = work[0][: raw.numel()].view(raw.shape)
            codes.copy_(raw)
            dst.addmv_(codes.t(), w)
            return
        per, cols = 8 // self.bits, raw.shape[1]
        res = None
        if self._use_compiled():
            try:
                res = _compiled("reconstruct", self.bits)(raw, w)  # (per, B), codes times 2^(k*b)
            except Exception as exc:  # noqa: BLE001 - any compiler failure: fall back
                _compile_failed(exc)
        if res is None:
            scaled = self._unpack(raw, work)
            res = work[2][: per * cols]
            torch.mv(scaled.view(self.n, per * cols).t(), w, out=res)
            res = res.view(per, cols)
        # element j*per + k gets res[k, j] * 2^(-k*b)
        s = dst.shape[0]
        full = s // per
        if full:
            dst[: full * per].view(full, per).addcmul_(res[:, :full].t(), self._inv.t())
        if full < cols:
            r = s - full * per
            dst[full * per :] += res[:r, full] * self._inv[:r, 0]

    # ------------------------------------------------------------ kernels

    def coef_grad(self, g: torch.Tensor) -> torch.Tensor:
        """Gradient slice g (m,) -> coefficient gradient G (n, L_r) = Q g per block."""
        g = g.to(self.data.device, torch.float32).contiguous()
        dot = torch.zeros(self.n, self.num_blocks, device=g.device)
        if self.bits == 32:
            for ch in self._chunks:
                vals = self.data[:, ch.start : ch.end]  # (n, s)
                gc = g[ch.start : ch.end]
                if ch.block is not None:
                    dot[:, ch.block] += vals @ gc
                else:
                    dot.index_add_(1, ch.seg, vals * gc)
            return dot
        work = self._workspace()
        partial = torch.empty(len(self._single), self.n, device=g.device)  # per single-block chunk
        for c, ch in enumerate(self._single):
            self._chunk_dot(self.data[:, ch.col_start : ch.col_end], g[ch.start : ch.end], partial[c], work)
        for l, c0, c1 in self._single_runs:  # consecutive chunks of one block (deterministic sums)
            dot[:, l] = partial[c0:c1].sum(dim=0)
        for ch in self._grouped:
            dot.index_add_(1, ch.seg, self._float_codes(ch, work) * g[ch.start : ch.end])
        gsum = torch.stack([part.sum() for part in g.split(self.sizes)]) if self.sizes else dot.new_zeros(0)
        return self.scale * dot + self.offset * gsum

    def reconstruct(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Coefficients X (n, L_r) -> weights w (m,) = c + sum_i X_il Q_il per block."""
        x = x.to(self.data.device, torch.float32)
        if out is None:
            out = torch.empty_like(self.center)
        if self.bits == 32:
            out.copy_(self.center)
            for ch in self._chunks:
                vals = self.data[:, ch.start : ch.end]  # (n, s)
                dst = out[ch.start : ch.end]
                if ch.block is not None:
                    dst.addmv_(vals.t(), x[:, ch.block])
                else:
                    dst += (x[:, ch.seg] * vals).sum(dim=0)
            return out
        if not out.is_contiguous():  # the kernels view slices of w as (bytes, per)
            return out.copy_(self.reconstruct(x))
        weights = (x * self.scale).t().contiguous()  # (L_r, n)
        base = (x * self.offset).sum(dim=0)  # (L_r,): the offsets' part, constant per block
        for l, (dst, c) in enumerate(zip(out.split(self.sizes), self.center.split(self.sizes))):
            torch.add(c, base[l], out=dst)
        work = self._workspace()
        for ch in self._single:
            raw = self.data[:, ch.col_start : ch.col_end]
            self._chunk_combine(raw, weights[ch.block], out[ch.start : ch.end], work)
        for ch in self._grouped:
            out[ch.start : ch.end] += (weights.t()[:, ch.seg] * self._float_codes(ch, work)).sum(dim=0)
        return out


def build_projection(
    candidates: torch.Tensor,
    sizes: Sequence[int],
    basis: str,
    bits: int,
    all_reduce=None,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    center: torch.Tensor | None = None,
    kernel: str | None = None,
) -> Projection:
    """Candidates (n, m) for a run of blocks -> its Projection. ``candidates`` is overwritten.

    ``all_reduce`` and ``center`` are passed to ``build_basis``.
    """
    center, u = build_basis(candidates, sizes, basis, all_reduce, center)
    return Projection.from_basis(center, u, sizes, bits, max_chunk_bytes, kernel)
