"""The eager kernel: chunked torch operations, on any device; the reference the others
are tested against, and the float kernels of b = 32.

Kernels stream the packed bytes in chunks (``chunks.plan_chunks``, bounded by the
projection's ``max_chunk_bytes``), so temporary memory does not grow with D. A byte holds
per = 8/b codes; one broadcast ``bytes & ((2^b - 1) << k*b)`` isolates code k of every
byte as code_k * 2^(k*b), laid out (n, per, bytes), and one copy turns the chunk to
floats (coef_grad first subtracts h * 2^(k*b) from the bytes, mod 256, and reads them as
int8: exact). The powers of two are folded, exactly, into the de-interleaved gradient
(coef_grad) or the result (reconstruct), so each chunk is one mask, one conversion and
one matrix-vector product. Measured throughput, against the earlier unpack-then-dot
kernels: benchmarks/RESULTS.md.

The coefficient gradient (b < 32) centres g per block, gc = g[B_l] - mean_l as rounded
in float32 (the projection module says why), and adds float32 products over at most
SUM_PIECE columns, then goes on in float64:

    G[i, l] = scale_il * < codes_il - h , gc > + (offset_il + scale_il * h) * sum(gc)
              + sum(Q_il) * mean_l,              sum(Q_il) precomputed exactly in float64.

Single-block chunks go through ``_chunk_dot`` / ``_chunk_combine``, which a kernel that
only replaces a chunk's unpack and product (``TritonKernel``) overrides.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .base import Kernel, middle
from .chunks import SUM_PIECE, Chunk, centre_code, chunk_elems, plan_chunks

if TYPE_CHECKING:
    from ..projection import Projection

Work = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class EagerKernel(Kernel):
    """The chunked torch kernels; at b < 32 the exact code sums are made when it is created."""

    name = "eager"

    def __init__(self, proj: "Projection") -> None:
        bits, n, dev = proj.bits, proj.n, proj.data.device
        self.bits, self.n = bits, n
        self._chunks = plan_chunks(proj.sizes, bits, chunk_elems(proj.max_chunk_bytes, n, bits), dev)
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
            self._masks = torch.tensor(masks, dtype=torch.uint8, device=dev).view(1, per, 1)
            # code k is read as code * 2^(k*b): these exact powers of two undo it
            self._inv = torch.tensor([2.0 ** (-k * bits) for k in range(per)], device=dev).view(per, 1)
            # the centre code read the same way; subtracted from the masked bytes (mod 256)
            # they read as int8 (code - 2^(b-1)) * 2^(k*b)
            self._shift = torch.tensor(
                [centre_code(bits) << (k * bits) for k in range(per)], dtype=torch.uint8, device=dev
            ).view(1, per, 1)
            self._pow = (1.0 / self._inv).double().view(per)  # 2^(k*b)
            self._sizes_t = torch.tensor(proj.sizes, dtype=torch.float64, device=dev)
            self._row_sums = self._exact_row_sums(proj)  # (n, L_r) float64: sum(Q_il)

    # ------------------------------------------------------------ the two operations

    def coef_grad(self, proj: "Projection", g: torch.Tensor) -> torch.Tensor:
        """Float32 products, float64 sums of pieces and of the terms; b < 32 on the centred
        gradient and codes (the module docstring)."""
        if self.bits == 32:
            dot = torch.zeros(self.n, proj.num_blocks, dtype=torch.float64, device=g.device)
            # float32 partial dot products: SUM_PIECE-column pieces of the single-block chunks, in order
            parts = torch.empty(self._pieces[-1], self.n, device=g.device)
            for c, ch in enumerate(self._single):
                out = parts[self._pieces[c] : self._pieces[c + 1]]
                self._piecewise_mv(proj.data[:, ch.start : ch.end], g[ch.start : ch.end], out)
            self._sum_pieces(parts, dot)
            for ch in self._grouped:  # small blocks sharing a chunk: products summed in float64
                dot.index_add_(1, ch.seg, (proj.data[:, ch.start : ch.end] * g[ch.start : ch.end]).double())
            return dot.float()
        # b < 32: Q = middle + scale * (codes - 2^(b-1)), middle = offset + scale * 2^(b-1)
        scale, mid = proj.scale.double(), middle(proj)
        # G = scale * <codes - 2^(b-1), gc> + middle * sum(gc) + sum(Q) * mean, where
        # gc = g - mean as rounded (its sum is not quite 0)
        mean = self._block_means(proj, g)  # (L_r,)
        dot, gc_sum = self._chunked_dots(proj, g, mean)
        return (scale * dot + mid * gc_sum + self._row_sums * mean.double()).float()

    def reconstruct(self, proj: "Projection", x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.bits == 32:
            out.copy_(proj.center)
            for ch in self._chunks:
                vals = proj.data[:, ch.start : ch.end]  # (n, s)
                dst = out[ch.start : ch.end]
                if ch.block is not None:
                    dst.addmv_(vals.t(), x[:, ch.block])
                else:
                    dst += (x[:, ch.seg] * vals).sum(dim=0)
            return out
        weights = (x * proj.scale).t().contiguous()  # (L_r, n)
        base = (x * proj.offset).sum(dim=0)  # (L_r,): the offsets' part, constant per block
        for l, (dst, c) in enumerate(zip(out.split(proj.sizes), proj.center.split(proj.sizes))):
            torch.add(c, base[l], out=dst)
        work = self._workspace(proj)
        for ch in self._single:
            raw = proj.data[:, ch.col_start : ch.col_end]
            self._chunk_combine(raw, weights[ch.block], out[ch.start : ch.end], work)
        for ch in self._grouped:
            out[ch.start : ch.end] += (weights.t()[:, ch.seg] * self._float_codes(proj, ch, work)).sum(dim=0)
        return out

    # ------------------------------------------------------------ one single-block chunk (b < 32)

    def _chunk_dot(self, raw: torch.Tensor, gt: torch.Tensor, out: torch.Tensor, work: Work) -> None:
        """<codes - 2^(b-1), g> per candidate for one single-block chunk, raw (n, B) and gt
        (per, B) the de-interleaved g, as partial sums out (k, n) (see ``_piecewise_mv``)."""
        scaled = self._unpack(raw, work, centred=True)  # (n, per, B)
        self._piecewise_mv(scaled.view(self.n, -1), gt.view(-1), out)

    def _chunk_combine(self, raw: torch.Tensor, w: torch.Tensor, dst: torch.Tensor, work: Work) -> None:
        """dst (s,) += sum_i w_i * codes_i for one single-block chunk."""
        per, cols = 8 // self.bits, raw.shape[1]
        if self.bits == 8:
            codes = work[0][: raw.numel()].view(raw.shape)
            codes.copy_(raw)
            dst.addmv_(codes.t(), w)
            return
        scaled = self._unpack(raw, work)
        res = work[2][: per * cols]
        torch.mv(scaled.view(self.n, per * cols).t(), w, out=res)
        self._add_interleaved(res.view(per, cols), dst)

    def _add_interleaved(self, res: torch.Tensor, dst: torch.Tensor) -> None:
        """dst (s,) += res (per, B) read back in element order: element j*per + k gets
        res[k, j] * 2^(-k*b)."""
        per, cols = res.shape
        s = dst.shape[0]
        full = s // per
        if full:
            dst[: full * per].view(full, per).addcmul_(res[:, :full].t(), self._inv.t())
        if full < cols:
            r = s - full * per
            dst[full * per :] += res[:r, full] * self._inv[:r, 0]

    # ------------------------------------------------------------ chunk helpers (b < 32)

    def _workspace(self, proj: "Projection") -> Work:
        """Buffers for one call: float codes and masked bytes (n*per*B each), a (per*B) vector."""
        per, cols, dev = 8 // self.bits, self._max_cols, proj.data.device
        return (
            torch.empty(self.n * per * cols, device=dev),
            torch.empty(self.n * per * cols, dtype=torch.uint8, device=dev),
            torch.empty(per * cols, device=dev),
        )

    def _unpack(self, raw: torch.Tensor, work: Work, centred: bool = False) -> torch.Tensor:
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

    def _deinterleave(self, g: torch.Tensor, work: Work, mean: torch.Tensor | None = None) -> torch.Tensor:
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

    def _float_codes(self, proj: "Projection", ch: Chunk, work: Work) -> torch.Tensor:
        """Float codes (n, end-start) of a chunk (b < 32): exact integers."""
        raw = proj.data[:, ch.col_start : ch.col_end]
        per, cols = 8 // self.bits, raw.shape[1]
        scaled = self._unpack(raw, work)  # (n, per, B)
        vals = (scaled * self._inv).transpose(1, 2).reshape(self.n, cols * per)
        return vals[:, ch.keep] if ch.keep is not None else vals[:, : ch.end - ch.start]

    def _exact_row_sums(self, proj: "Projection") -> torch.Tensor:
        """sum(Q_il) over each block's entries, (n, L_r) float64 (b < 32; integer codes summed exactly)."""
        codes = torch.zeros(self.n, proj.num_blocks, dtype=torch.float64, device=proj.data.device)
        work = self._workspace(proj)
        for ch in self._chunks:
            vals = self._float_codes(proj, ch, work)
            if ch.block is not None:
                codes[:, ch.block] += vals.sum(dim=1, dtype=torch.float64)
            else:
                codes.index_add_(1, ch.seg, vals.double())
        return proj.offset.double() * self._sizes_t + proj.scale.double() * codes

    def _block_means(self, proj: "Projection", g: torch.Tensor) -> torch.Tensor:
        """g (m,) -> (L_r,) float32 mean of each block (0 for an empty block)."""
        if not proj.sizes:
            return g.new_zeros(0)
        sums = torch.stack([part.sum() for part in g.split(proj.sizes)])
        return (sums / self._sizes_t.clamp(min=1)).float()

    def _chunked_dots(self, proj: "Projection", g: torch.Tensor,
                      mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunked part of ``coef_grad`` (b < 32): dot (n, L_r) float64, the centred
        codes' dot products with gc = g - mean per block, and gc_sum (L_r,) float64."""
        dot = torch.zeros(self.n, proj.num_blocks, dtype=torch.float64, device=g.device)
        # float32 partial dot products: SUM_PIECE-column pieces of the single-block chunks, in order
        parts = torch.empty(self._pieces[-1], self.n, device=g.device)
        gt_sums = torch.empty(len(self._single), 8 // self.bits, device=g.device)
        work = self._workspace(proj)
        for c, ch in enumerate(self._single):
            gt = self._deinterleave(g[ch.start : ch.end], work, mean[ch.block])  # (per, B), centred
            torch.sum(gt, dim=1, out=gt_sums[c])  # centred values: a float32 sum keeps its digits
            out = parts[self._pieces[c] : self._pieces[c + 1]]
            self._chunk_dot(proj.data[:, ch.col_start : ch.col_end], gt, out, work)
        self._sum_pieces(parts, dot)
        chunk_gc = gt_sums.double() @ self._pow  # (chunks,): sum of gc over each chunk
        gc_sum = torch.zeros(proj.num_blocks, dtype=torch.float64, device=g.device)
        for l, c0, c1 in self._single_runs:
            gc_sum[l] = chunk_gc[c0:c1].sum()
        for ch in self._grouped:  # small blocks sharing a chunk: products summed in float64
            gc = g[ch.start : ch.end] - mean[ch.seg]
            gc_sum.index_add_(0, ch.seg, gc.double())
            codes = self._float_codes(proj, ch, work) - centre_code(self.bits)
            dot.index_add_(1, ch.seg, (codes * gc).double())
        return dot, gc_sum

    def _sum_pieces(self, parts: torch.Tensor, dot: torch.Tensor) -> None:
        """dot[:, l] = the float64 sum of the partial dot products (pieces, n) of block l,
        in order (deterministic)."""
        for l, c0, c1 in self._single_runs:
            dot[:, l] = parts[self._pieces[c0] : self._pieces[c1]].sum(dim=0, dtype=torch.float64)
