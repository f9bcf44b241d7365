"""mixing.png and α: the effective weight of each candidate per block, exact where the basis allows it."""
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch

from twa_ray.core.projection import build_projection
from twa_ray.core.subspace import build_basis
from twa_ray.output.atomic import write_rows
from twa_ray.output.mixing import (ALPHA_PREFIX, MAX_TICKS, Mixing, alpha_problem, candidate_label, direction_norms,
                                   effective_weights, mixing_figure, mixing_rows, plot_mixing, run_mixing)
from twa_ray.store import CandidateStore

NAMES, SHAPES = ["conv.weight", "conv.bias", "fc.weight"], [(3, 4), (3,), (2, 5)]
SIZES = [12, 3, 10]  # granularity "tensor"


def make_store(tmp_path, n: int = 5, dead: bool = True):
    """A store of n candidates (D = 25); with ``dead`` the last one is the mean of the
    others, so it equals the center of all n: a zero direction in every block."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, sum(SIZES), generator=gen) * torch.tensor([1.0] * 12 + [0.01] * 3 + [3.0] * 10)
    if dead:
        w[-1] = w[:-1].double().mean(dim=0).float()
    store = CandidateStore.create(tmp_path / "store", NAMES, SHAPES)
    for i in range(n):
        store.append_flat(w[i], {"kind": "epoch", "epoch": i + 1, "step": 10 * (i + 1)})
    return store, w


def test_alpha_reconstructs_the_twa_weights_of_a_32_bit_normalized_basis(tmp_path):
    store, w = make_store(tmp_path)
    n = w.shape[0]
    x = torch.randn(n, len(SIZES), generator=torch.Generator().manual_seed(1))
    proj = build_projection(w.clone(), SIZES, "normalized", 32)
    twa_weights = proj.reconstruct(x).double()  # w(X) = c + sum_i X_il Q_il, the runtime's kernel

    norms, refs = direction_norms(store, list(range(n)), SIZES)
    alpha = effective_weights(x, norms, refs)
    mixed = torch.cat([alpha[:, l] @ w[:, a:b].double()
                       for l, (a, b) in enumerate(zip([0, 12, 15], [12, 15, 25]))])
    assert (mixed - twa_weights).abs().max() < 1e-5
    torch.testing.assert_close(alpha.sum(dim=0), torch.ones(len(SIZES), dtype=torch.float64))

    # float64 reference of the same basis: c + sum_i X_il u_il
    center, u = build_basis(w.clone(), SIZES, "normalized")
    ref = center.double() + torch.cat([x[:, l].double() @ u[:, a:b].double()
                                       for l, (a, b) in enumerate(zip([0, 12, 15], [12, 15, 25]))])
    assert (mixed - ref).abs().max() < 1e-5


def test_a_dead_direction_takes_no_coefficient(tmp_path):
    store, w = make_store(tmp_path)
    norms, refs = direction_norms(store, list(range(w.shape[0])), SIZES)
    x = torch.randn(w.shape[0], len(SIZES), generator=torch.Generator().manual_seed(2))
    moved = x.clone()
    moved[-1] += 5.0  # the dead candidate's coefficient: u = 0, so w(X) does not change
    torch.testing.assert_close(effective_weights(moved, norms, refs), effective_weights(x, norms, refs))
    assert (norms[:-1] > 1e-3).all()


def test_zero_coefficients_are_swa():
    alpha = effective_weights(torch.zeros(4, 3), torch.rand(4, 3) + 0.5, torch.ones(3))
    torch.testing.assert_close(alpha, torch.full((4, 3), 0.25, dtype=torch.float64))


def test_alpha_only_where_exact():
    assert alpha_problem("normalized", 32, 1) is None
    assert "orthonormal" in alpha_problem("orthonormal", 32, 1)
    assert "bits=8" in alpha_problem("normalized", 8, 1)
    assert "2 rounds" in alpha_problem("normalized", 32, 2)


@pytest.mark.parametrize("bits", [32, 8])
def test_run_mixing_and_coefficient_rows(tmp_path, bits):
    store, w = make_store(tmp_path, dead=False)
    x = torch.randn(3, len(SIZES), generator=torch.Generator().manual_seed(3))
    twa_cfg = SimpleNamespace(basis="normalized", bits=bits, granularity="tensor")
    mixing = run_mixing(store.uri, twa_cfg, [x], [[1, 2, 4]], NAMES)
    assert mixing.block_sizes == SIZES
    rows = mixing_rows(mixing)
    assert [(r["candidate"], r["epoch"], r["step"]) for r in rows] == [(1, 2, 20), (2, 3, 30), (4, 5, 50)]
    assert [r["fc.weight"] for r in rows] == pytest.approx(x[:, 2].tolist())
    alphas = [[r[ALPHA_PREFIX + name] for name in NAMES] for r in rows]
    if bits == 32:
        norms, refs = direction_norms(store, [1, 2, 4], SIZES)
        torch.testing.assert_close(torch.tensor(alphas, dtype=torch.float64), effective_weights(x, norms, refs))
        assert mixing.note == ""
    else:
        assert mixing.alpha is None and "bits=8" in mixing.note
        assert all(a is None for row in alphas for a in row)
    write_rows(tmp_path / "coefficients.parquet", rows)  # None alphas become a null column
    back = pq.read_table(tmp_path / "coefficients.parquet").to_pylist()
    assert back[0]["epoch"] == 2 and (back[0][ALPHA_PREFIX + "conv.bias"] is None) == (bits == 8)


def test_candidate_labels():
    assert candidate_label(0, {"kind": "initial", "epoch": 0, "step": 0}) == "init"
    assert candidate_label(3, {"kind": "epoch", "epoch": 3, "step": 120}) == "ep 3"
    assert candidate_label(9, {"kind": "step", "epoch": 2.5, "step": 100}) == "step 100"
    assert candidate_label(2, {"stage": "import", "source": "/ckpt", "entry": "model_2.safetensors"}) == "model_2"
    assert candidate_label(7, {}) == "cand 7"


def big_mixing(alpha: bool, n: int = 120, blocks: int = 150) -> Mixing:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(n, blocks, generator=gen)
    return Mixing(
        [x], [list(range(n))], [f"layer{l}.weight" for l in range(blocks)], [100 + l for l in range(blocks)],
        {i: {"kind": "epoch", "epoch": i + 1, "step": 50 * (i + 1)} for i in range(n)},
        alpha=(1.0 / n + 0.01 * x.double()) if alpha else None, note="" if alpha else "bits=8: quantised",
    )


@pytest.mark.parametrize("alpha", [True, False])
def test_mixing_plot_stays_readable_with_many_candidates_and_blocks(tmp_path, alpha):
    mixing = big_mixing(alpha)
    fig = mixing_figure(mixing)
    heat, side = fig.axes[0], fig.axes[1]
    rows = [t.get_text() for t in heat.get_yticklabels()]
    cols = [t.get_text() for t in heat.get_xticklabels()]
    assert 10 <= len(rows) <= MAX_TICKS and 10 <= len(cols) <= MAX_TICKS
    assert rows[0] == "ep 1" and rows[1] == "ep 4"  # every 3rd of 120 candidates, by epoch
    title = fig._suptitle.get_text()
    assert ("α" in title and "1/n = 0.00833" in title) if alpha else ("raw coefficients" in title and "bits=8" in title)
    assert len(side.patches) == 120  # a share bar per candidate
    plot_mixing(tmp_path / "plots" / "mixing.png", mixing)
    assert (tmp_path / "plots" / "mixing.png").read_bytes()[:4] == b"\x89PNG"
