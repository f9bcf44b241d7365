"""The subspace the candidates span: center, directions and a basis per block.

Candidates W (n, m) cover a run of whole blocks (all of the model, or one worker's
shard) with block sizes ``sizes`` (sum = m). Two published algorithms:

The journal algorithm (centred): the center is c = mean_i w_i (the SWA point, X = 0)
and the directions d_i = w_i - c span n - 1 dimensions. Bases of the directions:

- ``normalized`` (the journal paper): u_il = d_il / ||d_il|| per block.
- ``orthonormal``: per block, an orthonormal basis of span{d_il} (Gram-Schmidt on the
  block's n x n Gram matrix in float64, applied twice as in CholeskyQR2).
- ``orthonormal-global``: one orthonormal basis of the whole-model directions, from the
  whole-model Gram matrix (summed across shards by ``all_reduce``), restricted to each
  block without renormalisation.

The ICLR'23 algorithm (Li et al., "Trainable Weight Averaging"):

- ``checkpoints``: per block, an orthonormal basis of the *raw* candidates w_il (no
  centring: n dimensions, so the center itself can be rescaled), w[B_l] = sum_i X_il u_il.
  With granularity ``model`` (one block) it is the paper's basis exactly; with finer
  granularity each block gets its own orthonormal basis, so P_l g and the weight decay
  P_l (wd * w) stay exact per block. Its start point (``start_point``) is the mean, the
  last or a chosen candidate; ``block_coords`` gives its coordinates.

Dead directions (a zero direction, or one that depends linearly on earlier ones for the
orthonormal bases) become zero rows: finite, and their coefficients get zero gradient.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch

log = logging.getLogger(__name__)

# The journal algorithm's bases: centred directions, X = 0 is the SWA point, weight decay on X.
JOURNAL_BASES = ("normalized", "orthonormal", "orthonormal-global")
# The ICLR'23 algorithm's: the raw candidates' span, a start point, weight decay on the
# weights (toward 0).
RAW_BASES = ("checkpoints",)
BASES = JOURNAL_BASES + RAW_BASES
STARTS = ("mean", "last")  # or an integer index into the candidates

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


def check_start(start: str | int, count: int | None = None) -> str | int:
    """``start`` is "mean", "last" or an index 0 <= K < ``count`` (None: count unknown yet)."""
    if isinstance(start, bool) or not isinstance(start, (str, int)):
        raise ValueError(f"start {start!r} is not one of {list(STARTS)} or a candidate index")
    if isinstance(start, str):
        if start not in STARTS:
            raise ValueError(f"start {start!r} is not one of {list(STARTS)} or a candidate index")
        return start
    if start < 0:
        raise ValueError(f"start {start} is not a candidate index >= 0 (use 'last' for the last candidate)")
    if count is not None and start >= count:
        raise ValueError(f"start {start} is out of range: there are {count} candidates (indices 0..{count - 1})")
    return start


def start_point(w: torch.Tensor, start: str | int) -> torch.Tensor:
    """The start point (m,) float32 of candidates w (n, m): their mean (accumulated in
    float64), the last one, or candidate ``start``."""
    check_start(start, w.shape[0])
    if w.shape[0] == 0:
        raise ValueError("no candidates to start from")
    if start == "mean":
        return (w.sum(dim=0, dtype=torch.float64) / w.shape[0]).float()
    return w[-1 if start == "last" else start].float().clone()


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


def block_coords(u: torch.Tensor, s: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Coordinates of a point in a per-block basis: u (n, m), s (m,) -> (n, L) float64 with
    [:, l] = u[:, B_l] @ s[B_l] (float64 over column chunks)."""
    out = torch.zeros(u.shape[0], len(sizes), dtype=torch.float64, device=u.device)
    for l, (a, b) in enumerate(_segments(sizes)):
        for c in range(a, b, _CHUNK):
            e = min(b, c + _CHUNK)
            out[:, l] += u[:, c:e].double() @ s[c:e].double()
    return out


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


def _warn_degenerate(d: torch.Tensor, center: torch.Tensor, sizes: Sequence[int], centred: bool = True) -> None:
    """Warn when candidates coincide: their directions are dropped (the result stays finite).

    ``centred``: d are directions from ``center``; else d are the raw candidates."""
    if d.shape[0] == 0 or d.shape[1] == 0:
        return
    zero = _norm(d) <= ZERO_RTOL * max(float(_norm(center[None])[0]), float(_norm(d).max()), 1e-30)
    if bool(zero.all()):
        if centred:
            log.warning("all %d candidates equal their center in these %d coordinates: TWA cannot move away "
                        "from it (the result is the candidates' common value)", d.shape[0], d.shape[1])
        else:
            log.warning("all %d candidates are zero in these %d coordinates: they stay zero", d.shape[0], d.shape[1])
        return
    if bool(zero.any()):
        log.warning("candidate(s) %s %s: their directions are zero and stay unused",
                    zero.nonzero().flatten().tolist(), "equal the center" if centred else "are zero")
    rows = d[~zero]
    gram = _gram(rows)
    norms = gram.diagonal().sqrt()
    cosine = gram / (norms[:, None] * norms[None, :])
    same = (cosine > 1 - 1e-10).sum() - rows.shape[0]
    if same > 0:
        log.warning("%d pair(s) of candidates are identical up to scale: they add no direction", int(same) // 2)


def normalize_blocks(w: torch.Tensor, sizes: Sequence[int], norms: torch.Tensor, refs: Sequence[float]) -> None:
    """Scale each (row, block) of w (n, m) by 1 / its norm, in place: ``norms`` (n, L) float64
    are the norms, ``refs`` each block's scale; a row below ZERO_RTOL * ref becomes zero."""
    for l, (a, b) in enumerate(_segments(sizes)):
        col = norms[:, l]
        alive = col > ZERO_RTOL * refs[l]
        inv = torch.where(alive, 1.0 / torch.where(alive, col, torch.ones_like(col)), torch.zeros_like(col))
        w[:, a:b].mul_(inv.float()[:, None])


def orthonormalise_blocks(w: torch.Tensor, sizes: Sequence[int], refs: list[float],
                          all_reduce: AllReduce | None = None) -> None:
    """Rows of each block of w (n, m) -> an orthonormal basis of their span, in place.

    ``all_reduce`` sums the block Gram matrices over ranks that each hold part of every
    block (``core.row_shards``); None: w holds the whole blocks."""
    for _ in range(2):  # the second pass restores orthogonality lost to rounding
        grams = block_grams(w, sizes)
        if all_reduce is not None:
            grams = all_reduce(grams)
        for (a, b), gram, ref in zip(_segments(sizes), grams, refs):
            _apply_coeffs(gram_schmidt_coeffs(gram, ref), w[:, a:b])
        refs = [1.0] * len(sizes)  # after one pass, kept rows have norm 1


def orthonormalise_whole(w: torch.Tensor, ref: float, all_reduce: AllReduce | None = None) -> None:
    """Rows of w (n, m) -> an orthonormal basis of the span of the whole-model rows they are
    part of, in place: the Gram matrix is summed over ranks by ``all_reduce`` (None: w is all
    of them). ``ref``: the whole model's scale for the dead-direction test."""
    for _ in range(2):
        gram = _gram(w)
        if all_reduce is not None:
            gram = all_reduce(gram)
        _apply_coeffs(gram_schmidt_coeffs(gram, ref), w)
        ref = 1.0


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
    means this run of blocks is the whole model); it is given float64 tensors on
    ``w``'s device only. ``center`` (m,) replaces the mean as the origin (X = 0), e.g.
    the previous round's solution when candidates come in rounds.

    ``checkpoints`` spans the raw candidates: its center is zero (w = sum_i X_i u_i) and
    ``center`` is not accepted (``build_projection``'s start point takes its place).
    """
    check_basis(basis)
    if sum(sizes) != w.shape[1]:
        raise ValueError(f"block sizes sum to {sum(sizes)}, candidates have {w.shape[1]} columns")
    if basis in RAW_BASES:
        if center is not None:
            raise ValueError(f"basis {basis!r} spans the raw candidates and has no center; give a start point instead")
        center = torch.zeros(w.shape[1], device=w.device)
        _warn_degenerate(w, center, sizes, centred=False)
        orthonormalise_blocks(w, sizes, _block_ref_norms(center, w, sizes))
        return center, w
    center = center_and_directions(w, center)
    _warn_degenerate(w, center, sizes)
    refs = _block_ref_norms(center, w, sizes)
    if basis == "normalized":
        norms = torch.zeros(w.shape[0], len(sizes), dtype=torch.float64, device=w.device)
        for l, (a, b) in enumerate(_segments(sizes)):
            norms[:, l] = _norm(w[:, a:b])
        normalize_blocks(w, sizes, norms, refs)
        return center, w
    if basis == "orthonormal":
        orthonormalise_blocks(w, sizes, refs)
        return center, w
    # orthonormal-global: one Gram matrix over every block of every shard
    # every tensor handed to all_reduce lives on the candidates' device (NCCL takes no CPU tensors)
    ref2 = torch.tensor([sum(r * r for r in refs)], dtype=torch.float64, device=w.device)
    if all_reduce is not None:
        ref2 = all_reduce(ref2)
    orthonormalise_whole(w, float(ref2.sqrt()), all_reduce)
    return center, w
