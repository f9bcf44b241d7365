"""The projection Q[:, S] of one run of blocks, stored packed, and its two kernels.

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

Kernels stream the packed bytes in chunks (bounded by ``max_chunk_bytes``), so
temporary memory does not grow with D. A byte holds per = 8/b codes; one broadcast
``bytes & ((2^b - 1) << k*b)`` isolates code k of every byte as code_k * 2^(k*b),
laid out (n, per, bytes), and one copy turns the chunk to floats (coef_grad first
subtracts h * 2^(k*b) from the bytes, mod 256, and reads them as int8: exact). The powers
of two are folded, exactly, into the de-interleaved gradient (coef_grad) or the result
(reconstruct), so each chunk is one mask, one conversion and one matrix-vector product.
Measured throughput, against the earlier unpack-then-dot kernels: benchmarks/RESULTS.md.

Three implementations of the two kernels at b < 32, chosen by ``kernel`` (the config key
``twa.kernel``); b = 32 always runs the eager float kernels:

- ``eager``: the chunked torch operations above, on any device; the reference the others
  are tested against.
- ``native``: C++ on CPU tensors (``twa_ray.core.native``: compiled on first use and
  cached), on a whole run of blocks at once: codes are unpacked in registers, a tile of
  the centred gradient is reused by several candidate rows, and products are added in
  float32 over tiles of at most SUM_PIECE of them, tiles in float64. It centres g per
  tile rather than per block (the tile's mean times its exact code sums, in float64,
  restores <codes - 2^(b-1), g>), so g is read once, with no pass for block means first;
  results match eager to float32 rounding. Where it cannot be built (no compiler), one
  warning and eager.
- ``triton``: Triton chunk kernels (``twa_ray.core.kernels_triton``) in place of each
  chunk's unpack and matrix-vector product, on CUDA tensors (CPU ones only under the
  Triton interpreter, for tests). Opt-in: not yet measured on a GPU. Without the triton
  package, or if a kernel fails, one warning and eager.
- ``auto`` (default): native on CPU tensors where it builds, else eager; eager on CUDA
  tensors until the Triton kernels are measured on a GPU.

A kernel asked for on a device it cannot run on raises ValueError. Every tensor is made
on the data's device.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from . import native
from .quant import check_bits, dequantize, pack_bits, packed_bytes, quantize, unpack_bits
from .subspace import RAW_BASES, block_coords, build_basis, check_start, start_point

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 8 << 20
# Float codes of one chunk (b < 32) stay within this many bytes (and max_chunk_bytes):
# they are read back from the last-level cache, not L2, since smaller chunks pay more
# per-operation overhead (benchmarks/RESULTS.md).
CACHE_CHUNK_BYTES = 4 << 20
# The coefficient gradient's dot products add at most this many float32 products before
# the partial sums go on in float64: a long float32 sum loses digits as it grows.
SUM_PIECE = 1 << 15
# Blocks below this size share chunks (one pass for many small tensors: biases, norms);
# larger ones get chunks of their own, whose dot products use the piecewise sums.
GROUP_MAX_ELEMS = 1 << 12
KERNELS = ("auto", "eager", "native", "triton")


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

    A large block is cut into pieces; neighbouring blocks of fewer than GROUP_MAX_ELEMS
    elements share a chunk.
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
            seg = torch.cat([torch.full((sizes[l],), l, dtype=torch.long, device=device) for l in group])
            keep = torch.cat(
                [torch.arange(sizes[l], device=device) + (cols[l] - cols[l0]) * per_col for l in group]
            )
            chunks.append(_Chunk(starts[l0], starts[l1], cols[l0], cols[l1], None, seg, keep))
        group.clear()

    group_elems = 0
    for l, m in enumerate(sizes):
        if m == 0:
            continue
        if m >= min(chunk_elems, GROUP_MAX_ELEMS):
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


# ---------------------------------------------------------------- chunk kernel contract and choice

_WARNED: set[str] = set()
_TRITON_FAILED = False


def _warn_once(key: str, message: str, *args) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(message, *args)


def resolve_kernel(kernel: str, device: torch.device | str, bits: int) -> str:
    """The kernel that runs for ``kernel`` on tensors of ``device`` at ``bits``: "eager",
    "native" or "triton" (the module docstring says how ``auto`` and the fallbacks choose).

    Raises ValueError for an unknown kernel, or one asked for on a device it cannot run on.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not one of {list(KERNELS)}")
    device = torch.device(device)
    if bits == 32 or kernel == "eager":
        return "eager"
    if kernel == "auto":
        return "native" if device.type == "cpu" and native.available() else "eager"
    if kernel == "native":
        if device.type != "cpu":
            raise ValueError(f"kernel 'native' runs on CPU tensors, not {device.type} ones: use 'auto', 'eager' or 'triton'")
        return "native" if native.available() else "eager"  # native.load() warned once
    from . import kernels_triton

    try:
        kernels_triton.require_triton(device)
    except ImportError as exc:
        _warn_once("triton-import", "the triton projection kernels are unavailable, using the eager kernels: %s", exc)
        return "eager"
    except RuntimeError as exc:
        raise ValueError(str(exc)) from exc
    return "eager" if _TRITON_FAILED else "triton"


def _triton_failed(exc: BaseException) -> None:
    global _TRITON_FAILED
    _TRITON_FAILED = True
    _warn_once("triton-run", "a triton projection kernel failed (%s: %s); using the eager kernels",
               type(exc).__name__, exc)


def _fused_grad(bits: int) -> Callable:
    """The contract of a fused chunk kernel (``kernels_triton.triton_grad``), in torch:
    (raw (n, B) uint8, gt (per, B) float: de-interleaved, 2^-kb scaled) -> (n,) dot
    products of the centred codes (code - 2^(b-1)) with g."""
    masks = [((1 << bits) - 1) << (k * bits) for k in range(8 // bits)]
    shifts = [float(_centre_code(bits) << (k * bits)) for k in range(8 // bits)]

    def kernel(raw: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        acc = ((raw & masks[0]).to(torch.float32) - shifts[0]) * gt[0]
        for k in range(1, len(masks)):
            acc = acc + ((raw & masks[k]).to(torch.float32) - shifts[k]) * gt[k]
        return acc.sum(dim=1)

    return kernel


def _fused_reconstruct(bits: int) -> Callable:
    """The contract of ``kernels_triton.triton_reconstruct``, in torch:
    (raw (n, B) uint8, w (n,)) -> (per, B): sum_i w_i * code_k(byte j) * 2^(k*b)."""
    masks = [((1 << bits) - 1) << (k * bits) for k in range(8 // bits)]

    def kernel(raw: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return torch.stack([((raw & m).to(torch.float32) * w[:, None]).sum(dim=0) for m in masks])

    return kernel


def _centre_code(bits: int) -> int:
    """2^(b-1): the coefficient gradient works on code - 2^(b-1), which fits int8 even
    read in place as (code - 2^(b-1)) * 2^(k*b), for every k."""
    return 1 << (bits - 1)


class Projection:
    """Q[:, S] and c[S] for one run of blocks, with the two projection kernels.

    Attributes:
        bits: 1, 2, 4, 8 or 32.
        sizes: block sizes m_l of this run (L_r blocks, sum m).
        center: (m,) float32.
        data: (n, sum_l ceil(m_l*b/8)) uint8 for b < 32, else (n, m) float32.
        scale, offset: (n, L_r) float32 (b < 32 only; None for 32).
        kernel: "auto", "eager", "native" or "triton" (the module docstring says which runs
            where); may be changed any time.
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
        self.kernel = kernel or "auto"
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel={self.kernel!r} is not one of {list(KERNELS)}")
        self._sizes_cpu = torch.tensor(self.sizes, dtype=torch.int64, device="cpu")  # the native kernels' block sizes
        self._code_sums: torch.Tensor | None = None  # the native coef_grad's per-tile code sums, made on first use
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
        # single chunk c's partial dot products are pieces [_pieces[c], _pieces[c + 1])
        self._pieces = [0]
        for ch in self._single:
            length = ch.end - ch.start if bits == 32 else (ch.col_end - ch.col_start) * (8 // bits)
            self._pieces.append(self._pieces[-1] + -(-length // SUM_PIECE))
        if bits < 32:
            per = 8 // bits
            masks = [((1 << bits) - 1) << (k * bits) for k in range(per)]
            self._masks = torch.tensor(masks, dtype=torch.uint8, device=data.device).view(1, per, 1)
            # code k is read as code * 2^(k*b): these exact powers of two undo it
            self._inv = torch.tensor([2.0 ** (-k * bits) for k in range(per)], device=data.device).view(per, 1)
            # the centre code read the same way; subtracted from the masked bytes (mod 256)
            # they read as int8 (code - 2^(b-1)) * 2^(k*b)
            self._shift = torch.tensor(
                [_centre_code(bits) << (k * bits) for k in range(per)], dtype=torch.uint8, device=data.device
            ).view(1, per, 1)
            self._pow = (1.0 / self._inv).double().view(per)  # 2^(k*b)
            self._sizes_t = torch.tensor(self.sizes, dtype=torch.float64, device=data.device)
            self._row_sums = self._exact_row_sums()  # (n, L_r) float64: sum(Q_il)

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

    # ------------------------------------------------------------ chunk helpers (b < 32)

    def _workspace(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Buffers for one call: float codes and masked bytes (n*per*B each), a (per*B) vector."""
        per, cols, dev = 8 // self.bits, self._max_cols, self.data.device
        return (
            torch.empty(self.n * per * cols, device=dev),
            torch.empty(self.n * per * cols, dtype=torch.uint8, device=dev),
            torch.empty(per * cols, device=dev),
        )

    def _unpack(self, raw: torch.Tensor, work, centred: bool = False) -> torch.Tensor:
        """Packed bytes raw (n, B) -> (n, per, B) float: code k of byte j times 2^(k*b)
        (``centred``: (code - 2^(b-1)) times 2^(k*b), exact)."""
        per, cols = 8 // self.bits, raw.shape[1]
        out = work[0][: self.n * per * cols].view(self.n, per, cols)
        if per == 1 and not centred:
            out[:, 0].copy_(raw)
            return out
        src = work[1][: self.n * per * cols].view(self.n, per, cols)
        if per == 1:  # code - 128 as int8 is the byte with its top bit flipped
            torch.bitwise_xor(raw.unsqueeze(1), 0x80, out=src)
        else:
            torch.bitwise_and(raw.unsqueeze(1), self._masks, out=src)  # every code k in one pass
            if centred:
                src.sub_(self._shift)  # wraps mod 256: the bytes now read as int8
        out.copy_(src.view(torch.int8) if centred else src)
        return out

    @staticmethod
    def _piecewise_mv(a: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> None:
        """out (k, n) float32: row j = a[:, piece j] @ x[piece j], pieces of SUM_PIECE columns
        of a (n, s) and x (s,); k = ceil(s / SUM_PIECE). The caller adds the rows in float64."""
        for j, p in enumerate(range(0, x.shape[0], SUM_PIECE)):
            torch.mv(a[:, p : p + SUM_PIECE], x[p : p + SUM_PIECE], out=out[j])

    def _deinterleave(self, g: torch.Tensor, work, mean: torch.Tensor | None = None) -> torch.Tensor:
        """g (s,) -> (per, B) with [k, j] = g[j*per + k] * 2^(-k*b), zero past the end.

        ``mean`` (0-dim) is subtracted first, in the same pass: [k, j] = fl(g - mean) * 2^(-k*b).
        """
        per = 8 // self.bits
        s = g.shape[0]
        cols = -(-s // per)
        gt = work[2][: per * cols].view(per, cols)
        full = s // per
        if full:
            src = g[: full * per].view(full, per).t()
            if mean is None:
                torch.mul(src, self._inv, out=gt[:, :full])
            else:  # (g - mean) * 2^(-k*b): the scaling by a power of two is exact
                torch.addcmul(-mean * self._inv, src, self._inv, out=gt[:, :full])
        if full < cols:
            gt[:, full].zero_()
            r = s - full * per
            tail = g[full * per :] if mean is None else g[full * per :] - mean
            gt[:r, full] = tail * self._inv[:r, 0]
        return gt

    def _float_codes(self, ch: _Chunk, work) -> torch.Tensor:
        """Float codes (n, end-start) of a chunk (b < 32): exact integers."""
        raw = self.data[:, ch.col_start : ch.col_end]
        per, cols = 8 // self.bits, raw.shape[1]
        scaled = self._unpack(raw, work)  # (n, per, B)
        vals = (scaled * self._inv).transpose(1, 2).reshape(self.n, cols * per)
        return vals[:, ch.keep] if ch.keep is not None else vals[:, : ch.end - ch.start]

    def _exact_row_sums(self) -> torch.Tensor:
        """sum(Q_il) over each block's entries, (n, L_r) float64 (b < 32; integer codes summed exactly)."""
        codes = torch.zeros(self.n, self.num_blocks, dtype=torch.float64, device=self.data.device)
        work = self._workspace()
        for ch in self._chunks:
            vals = self._float_codes(ch, work)
            if ch.block is not None:
                codes[:, ch.block] += vals.sum(dim=1, dtype=torch.float64)
            else:
                codes.index_add_(1, ch.seg, vals.double())
        return self.offset.double() * self._sizes_t + self.scale.double() * codes

    def _block_means(self, g: torch.Tensor) -> torch.Tensor:
        """g (m,) -> (L_r,) float32 mean of each block (0 for an empty block)."""
        if not self.sizes:
            return g.new_zeros(0)
        sums = torch.stack([part.sum() for part in g.split(self.sizes)])
        return (sums / self._sizes_t.clamp(min=1)).float()

    def _chunk_dot(self, raw: torch.Tensor, gt: torch.Tensor, out: torch.Tensor, work, kernel: str) -> None:
        """<codes - 2^(b-1), g> per candidate for one single-block chunk, raw (n, B) and gt
        (per, B) the de-interleaved g, as partial sums out (k, n) (see ``_piecewise_mv``)."""
        if kernel == "triton" and not _TRITON_FAILED:
            from .kernels_triton import triton_grad

            try:
                out[0].copy_(triton_grad(raw, gt, self.bits))
                out[1:].zero_()
                return
            except Exception as exc:  # noqa: BLE001 - any kernel failure: fall back
                _triton_failed(exc)
        scaled = self._unpack(raw, work, centred=True)  # (n, per, B)
        self._piecewise_mv(scaled.view(self.n, -1), gt.view(-1), out)

    def _chunk_combine(self, raw: torch.Tensor, w: torch.Tensor, dst: torch.Tensor, work, kernel: str) -> None:
        """dst (s,) += sum_i w_i * codes_i for one single-block chunk."""
        per, cols = 8 // self.bits, raw.shape[1]
        res = None
        if kernel == "triton" and not _TRITON_FAILED:
            from .kernels_triton import triton_reconstruct

            try:
                res = triton_reconstruct(raw, w, self.bits)  # (per, B), codes times 2^(k*b)
            except Exception as exc:  # noqa: BLE001 - any kernel failure: fall back
                _triton_failed(exc)
        if res is None and self.bits == 8:
            codes = work[0][: raw.numel()].view(raw.shape)
            codes.copy_(raw)
            dst.addmv_(codes.t(), w)
            return
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
        """Gradient slice g (m,) -> coefficient gradient G (n, L_r) = Q g per block.

        Float32 products, float64 sums of pieces and of the terms; b < 32 on the centred
        gradient and codes (the module docstring says why and how).
        """
        g = g.to(self.data.device, torch.float32).contiguous()
        if self.bits == 32:
            dot = torch.zeros(self.n, self.num_blocks, dtype=torch.float64, device=g.device)
            # float32 partial dot products: SUM_PIECE-column pieces of the single-block chunks, in order
            parts = torch.empty(self._pieces[-1], self.n, device=g.device)
            for c, ch in enumerate(self._single):
                out = parts[self._pieces[c] : self._pieces[c + 1]]
                self._piecewise_mv(self.data[:, ch.start : ch.end], g[ch.start : ch.end], out)
            self._sum_pieces(parts, dot)
            for ch in self._grouped:  # small blocks sharing a chunk: products summed in float64
                dot.index_add_(1, ch.seg, (self.data[:, ch.start : ch.end] * g[ch.start : ch.end]).double())
            return dot.float()
        # b < 32: Q = middle + scale * (codes - 2^(b-1)), middle = offset + scale * 2^(b-1)
        scale, middle = self.scale.double(), self._middle()
        kernel = resolve_kernel(self.kernel, g.device, self.bits)
        if kernel == "native":  # <codes - 2^(b-1), g> centred per tile (twa_ray.core.native), and sum(g)
            data = self._contiguous_data()
            if self._code_sums is None:
                self._code_sums = native.code_sums(data, self._sizes_cpu, self.bits)
            dot, g_sum = native.coef_grad(data, g, self._sizes_cpu, self._code_sums, self.bits)
            return (scale * dot + middle * g_sum).float()
        # G = scale * <codes - 2^(b-1), gc> + middle * sum(gc) + sum(Q) * mean, where
        # gc = g - mean as rounded (its sum is not quite 0)
        mean = self._block_means(g)  # (L_r,)
        dot, gc_sum = self._chunked_dots(g, mean, kernel)
        return (scale * dot + middle * gc_sum + self._row_sums * mean.double()).float()

    def _chunked_dots(self, g: torch.Tensor, mean: torch.Tensor, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunked kernels' part of ``coef_grad`` (b < 32): dot (n, L_r) float64, the
        centred codes' dot products with gc = g - mean per block, and gc_sum (L_r,) float64."""
        dot = torch.zeros(self.n, self.num_blocks, dtype=torch.float64, device=g.device)
        # float32 partial dot products: SUM_PIECE-column pieces of the single-block chunks, in order
        parts = torch.empty(self._pieces[-1], self.n, device=g.device)
        gt_sums = torch.empty(len(self._single), 8 // self.bits, device=g.device)
        work = self._workspace()
        for c, ch in enumerate(self._single):
            gt = self._deinterleave(g[ch.start : ch.end], work, mean[ch.block])  # (per, B), centred
            torch.sum(gt, dim=1, out=gt_sums[c])  # centred values: a float32 sum keeps its digits
            out = parts[self._pieces[c] : self._pieces[c + 1]]
            self._chunk_dot(self.data[:, ch.col_start : ch.col_end], gt, out, work, kernel)
        self._sum_pieces(parts, dot)
        chunk_gc = gt_sums.double() @ self._pow  # (chunks,): sum of gc over each chunk
        gc_sum = torch.zeros(self.num_blocks, dtype=torch.float64, device=g.device)
        for l, c0, c1 in self._single_runs:
            gc_sum[l] = chunk_gc[c0:c1].sum()
        for ch in self._grouped:  # small blocks sharing a chunk: products summed in float64
            gc = g[ch.start : ch.end] - mean[ch.seg]
            gc_sum.index_add_(0, ch.seg, gc.double())
            codes = self._float_codes(ch, work) - _centre_code(self.bits)
            dot.index_add_(1, ch.seg, (codes * gc).double())
        return dot, gc_sum

    def _contiguous_data(self) -> torch.Tensor:
        return self.data if self.data.is_contiguous() else self.data.contiguous()

    def _middle(self) -> torch.Tensor:
        """(n, L_r) float64 offset + scale * 2^(b-1): Q = middle + scale * (codes - 2^(b-1))."""
        return self.offset.double() + self.scale.double() * _centre_code(self.bits)

    def _sum_pieces(self, parts: torch.Tensor, dot: torch.Tensor) -> None:
        """dot[:, l] = the float64 sum of the partial dot products (pieces, n) of block l,
        in order (deterministic)."""
        for l, c0, c1 in self._single_runs:
            dot[:, l] = parts[self._pieces[c0] : self._pieces[c1]].sum(dim=0, dtype=torch.float64)

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
        kernel = resolve_kernel(self.kernel, x.device, self.bits)
        if kernel == "native":  # on centred codes: Q = middle + scale * (codes - 2^(b-1))
            base = (x.double() * self._middle()).sum(dim=0).float()  # (L_r,)
            return native.reconstruct(self._contiguous_data(), weights, base, self.center.contiguous(),
                                      self._sizes_cpu, self.bits, out)
        base = (x * self.offset).sum(dim=0)  # (L_r,): the offsets' part, constant per block
        for l, (dst, c) in enumerate(zip(out.split(self.sizes), self.center.split(self.sizes))):
            torch.add(c, base[l], out=dst)
        work = self._workspace()
        for ch in self._single:
            raw = self.data[:, ch.col_start : ch.col_end]
            self._chunk_combine(raw, weights[ch.block], out[ch.start : ch.end], work, kernel)
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
