"""The projection kernels as they were before the fused ones (commit 869dc19), for a
before/after comparison inside one benchmark run: unpack every chunk to a (n, s) uint8
array of codes with a broadcast shift, convert it to float, then a matrix-vector product.
"""
from __future__ import annotations

import torch

from twa_ray.core.projection import DEFAULT_CHUNK_BYTES, Projection, _plan_chunks
from twa_ray.core.quant import unpack_bits


class BeforeProjection:
    """coef_grad / reconstruct of the earlier implementation over an existing Projection's data."""

    def __init__(self, proj: Projection, max_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.p = proj
        chunk_elems = max(64, (max_chunk_bytes // (4 * max(1, proj.n))) // 64 * 64)
        self._chunks = _plan_chunks(proj.sizes, proj.bits, chunk_elems, proj.data.device)

    def _codes(self, ch) -> torch.Tensor:
        raw = self.p.data[:, ch.col_start : ch.col_end]
        if self.p.bits == 32:
            return raw
        codes = unpack_bits(raw, self.p.bits)
        codes = codes[:, ch.keep] if ch.keep is not None else codes[:, : ch.end - ch.start]
        return codes.float()

    def coef_grad(self, g: torch.Tensor) -> torch.Tensor:
        p = self.p
        dot = torch.zeros(p.n, p.num_blocks, device=g.device)
        gsum = torch.zeros(p.num_blocks, device=g.device)
        for ch in self._chunks:
            vals = self._codes(ch)
            gc = g[ch.start : ch.end]
            if ch.block is not None:
                dot[:, ch.block] += vals @ gc
                gsum[ch.block] += gc.sum()
            else:
                dot.index_add_(1, ch.seg, vals * gc)
                gsum.index_add_(0, ch.seg, gc)
        if p.bits == 32:
            return dot
        return p.scale * dot + p.offset * gsum

    def reconstruct(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        p = self.p
        if out is None:
            out = torch.empty_like(p.center)
        out.copy_(p.center)
        if p.bits == 32:
            weights, base = x, None
        else:
            weights = x * p.scale
            base = (x * p.offset).sum(dim=0)
        for ch in self._chunks:
            vals = self._codes(ch)
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


def with_before_kernels(proj: Projection) -> Projection:
    """A Projection over the same tensors whose coef_grad / reconstruct are the earlier ones."""
    clone = Projection(proj.center, proj.data, proj.sizes, proj.bits, proj.scale, proj.offset, proj.max_chunk_bytes)
    before = BeforeProjection(proj)
    clone.coef_grad = before.coef_grad  # type: ignore[method-assign]
    clone.reconstruct = before.reconstruct  # type: ignore[method-assign]
    return clone
