"""How much each candidate contributes to the TWA model, per block: ``plots/mixing.png``
and the α / epoch / step columns of ``coefficients.parquet``.

TWA's weights are w = c + sum_i X_il Q_il per block l. Where that is exactly a mix of the
candidates, w[B_l] = sum_i α_il w_i[B_l], the effective weights α are shown: for the
``normalized`` basis at 32 bits in one round (c the candidates' mean, Q_il = u_il =
d_il / ||d_il||, d_il = w_i[B_l] - c[B_l]),

    α_il = 1/n + X_il / ||d_il|| - (1/n) sum_j X_jl / ||d_jl||      (sum_i α_il = 1)

(a dead direction, ||d_il|| below ``ZERO_RTOL`` x the block's scale, has u_il = 0 and
counts with 1/||d_il|| = 0). α = 1/n everywhere is SWA. Elsewhere the raw coefficients X
are shown and the plot's title says why: with b < 32 bits Q_il is a quantised direction
outside the candidates' span; the orthonormal bases mix directions through Gram-Schmidt
coefficients that the run does not keep; a later round is centred on the previous
round's solution.

    mixing = run_mixing(store_uri, cfg.twa, twa.coefficients, twa.rounds, twa.block_names)
    write_rows(run_dir / "coefficients.parquet", mixing_rows(mixing))
    plot_mixing(run_dir / "plots" / "mixing.png", mixing)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..core.baselines import INITIAL_KIND
from ..core.subspace import ZERO_RTOL

ALPHA_PREFIX = "alpha:"  # coefficients.parquet: column alpha:<block name>, next to <block name> (X)
MAX_TICKS = 40  # tick labels per axis: every k-th row or block beyond this


@dataclass
class Mixing:
    """What mixing.png and coefficients.parquet show of a TWA run.

    ``coefficients[r]`` (n_r, L) is round r's X for candidates ``rounds[r]``; ``alpha`` (n, L)
    float64 the effective weights of the (single) round's candidates, or None with
    ``note`` saying why; ``infos`` maps a candidate index to its store info (epoch, step...)."""

    coefficients: list[torch.Tensor]
    rounds: list[list[int]]
    block_names: list[str]
    block_sizes: list[int]
    infos: dict[int, dict]
    alpha: torch.Tensor | None = None
    note: str = ""


def alpha_problem(basis: str, bits: int, num_rounds: int) -> str | None:
    """Why α = f(X, block norms) is not exact for this run (None: it is)."""
    if basis != "normalized":
        return f"basis={basis}: α needs the normalized basis"
    if bits != 32:
        return f"bits={bits}: the quantised directions leave the candidates' span (α needs bits=32)"
    if num_rounds != 1:
        return f"{num_rounds} rounds: later rounds are centred on the previous solution (α needs one round)"
    return None


def direction_norms(store, candidates: Sequence[int], sizes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block norms of the directions d_i = w_i - c (c the candidates' mean), as the
    normalized basis computes them, reading one candidate at a time (memory O(D)).

    Returns (norms (n, L) float64, refs (L,) float64), refs_l = max(||c_l||, max_i ||d_il||):
    the block scale the basis compares a direction with (``ZERO_RTOL``)."""
    total = torch.zeros(store.num_params, dtype=torch.float64)
    for c in candidates:
        total += store.read_flat(c).double()
    center = (total / max(1, len(candidates))).float()  # as subspace.center_and_directions
    del total
    ends = list(accumulate(sizes))
    segments = list(zip([0] + ends[:-1], ends))
    norms = torch.zeros(len(candidates), len(sizes), dtype=torch.float64)
    for i, c in enumerate(candidates):
        d = store.read_flat(c) - center  # float32, as the basis subtracts
        for l, (a, b) in enumerate(segments):
            norms[i, l] = torch.linalg.vector_norm(d[a:b], dtype=torch.float64)
    center_norms = torch.tensor([float(torch.linalg.vector_norm(center[a:b], dtype=torch.float64))
                                 for a, b in segments], dtype=torch.float64)
    refs = torch.maximum(center_norms, norms.amax(dim=0)) if len(candidates) else center_norms
    return norms, refs


def effective_weights(x: torch.Tensor, norms: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """α (n, L) float64 with w[B_l] = sum_i α_il w_i[B_l] for the normalized basis at 32 bits:
    coefficients x (n, L), direction norms (n, L) and block scales refs (L,) (``direction_norms``)."""
    n = x.shape[0]
    norms = norms.double()
    alive = norms > ZERO_RTOL * refs.double()[None, :]
    inv = torch.where(alive, 1.0 / torch.where(alive, norms, torch.ones_like(norms)), torch.zeros_like(norms))
    y = x.double() * inv
    return 1.0 / n + y - y.mean(dim=0, keepdim=True)


def run_mixing(store_uri: str, twa_cfg, coefficients: Sequence[torch.Tensor], rounds: Sequence[Sequence[int]],
               block_names: Sequence[str]) -> Mixing:
    """The Mixing of a TWA run over the store at ``store_uri`` (``twa_cfg``: its basis, bits
    and granularity); α is computed (one more pass over the candidates) where exact."""
    from ..core.blocks import make_blocks
    from ..store import CandidateStore

    store = CandidateStore.open(store_uri)
    sizes = make_blocks(store.numels, twa_cfg.granularity).sizes
    infos = {c.index: dict(c.info) for c in store.list_candidates()}
    mixing = Mixing([x.detach().cpu() for x in coefficients], [list(r) for r in rounds], list(block_names), sizes, infos)
    problem = alpha_problem(twa_cfg.basis, twa_cfg.bits, len(rounds))
    if problem is not None:
        mixing.note = problem
        return mixing
    norms, refs = direction_norms(store, mixing.rounds[0], sizes)
    mixing.alpha = effective_weights(mixing.coefficients[0], norms, refs)
    return mixing


def candidate_label(index: int, info: Mapping[str, Any]) -> str:
    """A candidate's row label: the epoch or step it came from ("ep 3", "step 1200",
    "init"), an imported model's file name, else its index."""
    kind = info.get("kind")
    if kind == INITIAL_KIND:
        return "init"
    if kind == "step" and info.get("step") is not None:
        return f"step {info['step']}"
    if info.get("epoch") is not None:
        epoch = info["epoch"]
        return f"ep {epoch:g}" if isinstance(epoch, (int, float)) else f"ep {epoch}"
    if info.get("source") or info.get("entry"):
        return Path(str(info.get("entry") or info.get("source"))).stem[:20]
    return f"cand {index}"


def mixing_rows(mixing: Mixing) -> list[dict]:
    """coefficients.parquet: one row per (round, candidate): round, candidate, its epoch and
    step (None when the store has none), X per block (column <block name>) and α per
    block (column alpha:<block name>; None where α is not exact)."""
    rows = []
    for r, (x, indices) in enumerate(zip(mixing.coefficients, mixing.rounds)):
        for i, cand in enumerate(indices):
            info = mixing.infos.get(int(cand), {})
            row = {"round": r, "candidate": int(cand), "epoch": info.get("epoch"), "step": info.get("step")}
            row.update({name: float(v) for name, v in zip(mixing.block_names, x[i].tolist())})
            alpha = mixing.alpha[i].tolist() if mixing.alpha is not None else [None] * len(mixing.block_names)
            row.update({ALPHA_PREFIX + name: a for name, a in zip(mixing.block_names, alpha)})
            rows.append(row)
    return rows


def _ticks(count: int) -> range:
    return range(0, count, max(1, math.ceil(count / MAX_TICKS)))


def plot_mixing(path: str | Path, mixing: Mixing) -> None:
    """plots/mixing.png (``mixing_figure``), written atomically."""
    from .plots import _save

    _save(mixing_figure(mixing), path)


def mixing_figure(mixing: Mixing):
    """A heatmap, candidates (rows, labelled with their epoch or step) x blocks, of α - 1/n
    (or the raw X; the title says which, and why), and beside it each candidate's share of
    the model: its values averaged over the blocks, weighted by the blocks' parameter
    counts. Tick labels thin out to at most MAX_TICKS per axis. Returns the matplotlib Figure."""
    from .plots import plt

    if mixing.alpha is not None:
        n = mixing.alpha.shape[0]
        values = mixing.alpha - 1.0 / n
        labels = [candidate_label(c, mixing.infos.get(c, {})) for c in mixing.rounds[0]]
        title = f"effective weight α of each candidate per block (w = Σ α·w over candidates), centred on 1/n = {1.0 / n:.3g}"
        colour_label, share_label, share_zero = "α - 1/n", "mean α (size-weighted)", 1.0 / n
        shares = values + 1.0 / n
    else:
        many = len(mixing.rounds) > 1
        values = torch.cat([x.double() for x in mixing.coefficients]) if mixing.coefficients else torch.zeros(0, 0)
        labels = [(f"r{r} " if many else "") + candidate_label(c, mixing.infos.get(c, {}))
                  for r, indices in enumerate(mixing.rounds) for c in indices]
        title = f"raw coefficients X (not α: {mixing.note})"
        colour_label, share_label, share_zero = "coefficient X", "mean X (size-weighted)", 0.0
        shares = values
    rows, num_blocks = values.shape
    weights = torch.tensor(mixing.block_sizes, dtype=torch.float64) if len(mixing.block_sizes) == num_blocks \
        else torch.ones(num_blocks, dtype=torch.float64)
    share = (shares @ weights / weights.sum().clamp_min(1.0)).tolist() if rows else []

    height = min(16.0, max(4.0, 1.8 + 0.16 * rows))
    width = min(20.0, max(7.0, 4.5 + 0.11 * num_blocks))
    fig, (ax, side) = plt.subplots(1, 2, figsize=(width, height), sharey=True,
                                   gridspec_kw={"width_ratios": [4, 1]})
    # the colour scale spans 99% of the values, so a few outliers do not wash out the rest
    magnitudes = values.abs().flatten()
    limit = float(torch.quantile(magnitudes, 0.99)) if magnitudes.numel() else 0.0
    limit = limit or (float(magnitudes.max()) if magnitudes.numel() else 0.0) or 1.0
    image = ax.imshow(values.numpy(), aspect="auto", cmap="coolwarm", vmin=-limit, vmax=limit, interpolation="nearest")
    ax.set_yticks(list(_ticks(rows)), [labels[i] for i in _ticks(rows)], fontsize=7)
    ax.set_xticks(list(_ticks(num_blocks)), [mixing.block_names[i] for i in _ticks(num_blocks)],
                  rotation=90, fontsize=6)
    ax.set_xlabel(f"block ({num_blocks})")
    ax.set_ylabel(f"candidate ({rows})")
    fig.colorbar(image, ax=ax, label=colour_label, fraction=0.03, pad=0.01, shrink=0.8)
    side.barh(range(rows), [s - share_zero for s in share], left=share_zero, height=0.8,
              color=["tab:red" if s > share_zero else "tab:blue" for s in share])
    side.axvline(share_zero, color="black", linewidth=0.8)
    side.set_xlabel(share_label, fontsize=8)
    side.tick_params(axis="x", labelsize=7)
    side.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
