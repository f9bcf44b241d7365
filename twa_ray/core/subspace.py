"""The subspace the candidates span: center, directions and a basis per block.

Candidates W (n, m) cover a run of whole blocks (all of the model, or one worker's
shard) with block sizes ``sizes`` (sum = m). The center is c = mean_i w_i and the
directions d_i = w_i - c. Bases:

- ``normalized`` (journal paper): u_il = d_il / ||d_il|| per block.
- ``orthonormal``: per block, an orthonormal basis of span{d_il} (Gram-Schmidt on the
  block's n x n Gram matrix in float64, applied twice as in CholeskyQR2).
- ``orthonormal-global`` (ICLR paper): one orthonormal basis of the whole-model
  directions, from the whole-model Gram matrix (summed across shards by ``all_reduce``),
  restricted to each block without renormalisation.

Dead directions (a zero direction, or one that depends linearly on earlier ones for the
orthonormal bases) become zero rows: finite, and their coefficients get zero gradient.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

log = logging.getLogger(__name__)

BASES = ("normalized", "orthonormal", "orthonormal-global")

# A direction whose norm is below ZERO_RTOL x the block's scale (center or largest
# direction) is float32 rounding of the mean, i.e. a candidate equal to the center.
ZERO_RTOL = 1e-6
# A direction whose component outside the earlier ones is below DEP_RTOL x its norm
# is linearly dependent on them (float32 rounding is ~1e-7 relative).
DEP_RTOL = 1e-4

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def check_basis(basis: str) -> str:
    if basis not in BASES:
        raise ValueError(f"basis {basis!r} is not one of {list(BASES)}")
    return basis


def center_and_directions(w: torch.Tensor, center: torch.Tensor | None = None) -> torch.Tensor:
    """Turn candidates (n, m) into directions in place; return the center (m,).

    The center is the mean (accumulated in float64, so duplicates of the center give
    exact zeros) unless one is given, e.g. the previous round's solution.
    """
    if center is None:
        center = (w.sum(dim=0, dtype=torch.float64) / max(1, w.shape[0])).float()
    else:
        center = center.to(w.device, torch.float32).clone()
    w.sub_(center)
    return center


def _segments(sizes: Sequence[int]) -> list[tuple[int, int]]:
    out, pos = [], 0
    for m in sizes:
        out.append((pos, pos + m))
        pos += m
    return out


# Columns per float64 temporary, so memory stays bounded for a whole-model block.
_CHUNK = 1 << 18


def _gram(d: torch.Tensor) -> torch.Tensor:
    """(n, m) -> D D^T (n, n) float64, accumulated over column chunks."""
    gram = torch.zeros(d.shape[0], d.shape[0], dtype=torch.float64, device=d.device)
    for a in range(0, d.shape[1], _CHUNK):
        blk = d[:, a : a + _CHUNK].double()
        gram += blk @ blk.T
    return gram


def _apply_coeffs(coeffs: torch.Tensor, d: torch.Tensor) -> None:
    """d (n, m) <- coeffs (n, n) @ d, in float64 over column chunks."""
    for a in range(0, d.shape[1], _CHUNK):
        blk = d[:, a : a + _CHUNK]
        blk.copy_(coeffs @ blk.double())


def block_grams(d: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Directions (n, m) -> Gram matrices (L, n, n) float64, one per block."""
    n = d.shape[0]
    grams = [_gram(d[:, a:b]) for a, b in _segments(sizes)]
    return torch.stack(grams) if grams else torch.zeros(0, n, n, dtype=torch.float64, device=d.device)


def gram_schmidt_coeffs(gram: torch.Tensor, ref_norm: float) -> torch.Tensor:
    """Coefficients T (n, n) such that the rows of T @ D are orthonormal or zero.

    ``gram`` = D D^T (n, n) float64. Row i of T is zero when d_i is below
    ZERO_RTOL * ref_norm or depends on the earlier kept directions (DEP_RTOL).
    """
    n = gram.shape[0]
    coeffs = torch.zeros(n, n, dtype=torch.float64, device=gram.device)
    for i in range(n):
        gii = float(gram[i, i])
        if gii <= 0.0 or gii ** 0.5 <= ZERO_RTOL * ref_norm:
            continue
        proj = coeffs @ gram[:, i]  # <q_k, d_i> for the basis so far
        resid2 = gii - float(proj @ proj)
        if resid2 <= (DEP_RTOL ** 2) * gii:
            continue
        row = -(proj @ coeffs)
        row[i] += 1.0
        coeffs[i] = row / resid2 ** 0.5
    return coeffs


def _norm(rows: torch.Tensor) -> torch.Tensor:
    """Row norms (n, m) -> (n,) accumulated in float64."""
    return torch.linalg.vector_norm(rows, dim=1, dtype=torch.float64)


def _block_ref_norms(center: torch.Tensor, d: torch.Tensor, sizes: Sequence[int]) -> list[float]:
    refs = []
    for a, b in _segments(sizes):
        c_norm = float(_norm(center[a:b][None])[0])
        d_norm = float(_norm(d[:, a:b]).max()) if d.shape[0] else 0.0
        refs.append(max(c_norm, d_norm))
    return refs


def _warn_degenerate(d: torch.Tensor, center: torch.Tensor, sizes: Sequence[int]) -> None:
    """Warn when candidates coincide: their directions are dropped (the result stays finite)."""
    if d.shape[0] == 0 or d.shape[1] == 0:
        return
    zero = _norm(d) <= ZERO_RTOL * max(float(_norm(center[None])[0]), float(_norm(d).max()), 1e-30)
    if bool(zero.all()):
        log.warning("all %d candidates equal their center in these %d coordinates: TWA cannot move away "
                    "from it (the result is the candidates' common value)", d.shape[0], d.shape[1])
        return
    if bool(zero.any()):
        log.warning("candidate(s) %s equal the center: their directions are zero and stay unused",
                    zero.nonzero().flatten().tolist())
    rows = d[~zero]
    gram = _gram(rows)
    norms = gram.diagonal().sqrt()
    cosine = gram / (norms[:, None] * norms[None, :])
    same = (cosine > 1 - 1e-10).sum() - rows.shape[0]
    if same > 0:
        log.warning("%d pair(s) of candidates are identical up to scale: they add no direction", int(same) // 2)


def build_basis(
    w: torch.Tensor,
    sizes: Sequence[int],
    basis: str,
    all_reduce: AllReduce | None = None,
    center: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates (n, m) -> (center (m,), basis (n, m)); ``w`` is overwritten by the basis.

    ``sizes`` are the block sizes of this run of blocks. ``all_reduce`` sums a tensor
    over the shards of a sharded model (needed by ``orthonormal-global`` only; None
    means this run of blocks is the whole model). ``center`` (m,) replaces the mean as
    the origin (X = 0), e.g. the previous round's solution when candidates come in rounds.
    """
    check_basis(basis)
    if sum(sizes) != w.shape[1]:
        raise ValueError(f"block sizes sum to {sum(sizes)}, candidates have {w.shape[1]} columns")
    center = center_and_directions(w, center)
    _warn_degenerate(w, center, sizes)
    refs = _block_ref_norms(center, w, sizes)
    if basis == "normalized":
        for (a, b), ref in zip(_segments(sizes), refs):
            blk = w[:, a:b]
            norms = _norm(blk)
            alive = norms > ZERO_RTOL * ref
            inv = torch.where(alive, 1.0 / torch.where(alive, norms, torch.ones_like(norms)), torch.zeros_like(norms))
            blk.mul_(inv.float()[:, None])
        return center, w
    if basis == "orthonormal":
        for _ in range(2):  # the second pass restores orthogonality lost to rounding
            grams = block_grams(w, sizes)
            for (a, b), gram, ref in zip(_segments(sizes), grams, refs):
                _apply_coeffs(gram_schmidt_coeffs(gram, ref), w[:, a:b])
            refs = [1.0] * len(sizes)  # after one pass, kept rows have norm 1
        return center, w
    # orthonormal-global: one Gram matrix over every block of every shard
    ref2 = torch.tensor([sum(r * r for r in refs)], dtype=torch.float64)
    if all_reduce is not None:
        ref2 = all_reduce(ref2)
    ref = float(ref2.sqrt())
    for _ in range(2):
        gram = _gram(w)
        if all_reduce is not None:
            gram = all_reduce(gram)
        _apply_coeffs(gram_schmidt_coeffs(gram, ref), w)
        ref = 1.0
    return center, w
