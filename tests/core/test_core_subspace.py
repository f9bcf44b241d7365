"""Subspace construction: SWA point, candidate recovery, orthonormality, degenerate inputs."""
import pytest
import torch

from twa_ray.core.projection import build_projection
from twa_ray.core.subspace import JOURNAL_BASES, build_basis

SIZES = [12, 30, 5]


def _cands(n=4, seed=0):
    return torch.randn(n, sum(SIZES), generator=torch.Generator().manual_seed(seed))


def _segments():
    pos = 0
    for m in SIZES:
        yield pos, pos + m
        pos += m


@pytest.mark.parametrize("basis", JOURNAL_BASES)
@pytest.mark.parametrize("bits", [1, 4, 32])
def test_zero_coefficients_give_the_swa_point(basis, bits):
    w = _cands()
    proj = build_projection(w.clone(), SIZES, basis, bits)
    assert torch.allclose(proj.reconstruct(torch.zeros(4, len(SIZES))), w.mean(0), atol=1e-6)


def test_normalized_basis_selects_each_candidate():
    w = _cands()
    proj = build_projection(w.clone(), SIZES, "normalized", 32)
    d = w - w.mean(0)
    for j in range(4):
        x = torch.zeros(4, len(SIZES))
        for l, (a, b) in enumerate(_segments()):
            x[j, l] = d[j, a:b].norm()
        assert torch.allclose(proj.reconstruct(x), w[j], atol=1e-5)


@pytest.mark.parametrize("basis", ["orthonormal", "orthonormal-global"])
def test_orthonormal_bases_span_the_candidates(basis):
    w = _cands(5)
    center, u = build_basis(w.clone(), SIZES, basis)
    d = w - center
    blocks = list(_segments()) if basis == "orthonormal" else [(0, sum(SIZES))]
    for a, b in blocks:
        blk = u[:, a:b] if basis == "orthonormal" else u
        gram = blk @ blk.T
        kept = gram.diagonal() > 0.5
        # n directions summing to zero span n - 1 dimensions
        assert int(kept.sum()) == 4
        assert torch.allclose(gram[kept][:, kept], torch.eye(4), atol=1e-5)
        # every direction lies in the span: projecting onto the basis recovers it
        basis_rows = blk[kept]
        target = d[:, a:b] if basis == "orthonormal" else d
        assert torch.allclose((target @ basis_rows.T) @ basis_rows, target, atol=1e-4)


@pytest.mark.parametrize("basis", JOURNAL_BASES)
@pytest.mark.parametrize("bits", [2, 8, 32])
def test_degenerate_candidates_give_finite_correct_results(basis, bits):
    base = _cands(3, seed=5)
    cases = {
        "duplicates": torch.stack([base[0], base[0], base[1], base[1]]),
        "all identical": base[0].repeat(3, 1),
        "one equals the center": torch.stack([base[0], base[1], (base[0] + base[1]) / 2]),
        "dependent": torch.stack([base[0], base[1], base[2], 2 * base[0] - base[1]]),
    }
    const_block = base.clone()
    const_block[:, :12] = 0.7  # every candidate equal in block 0
    cases["constant block"] = const_block
    flat_dir = base.clone()
    flat_dir[:, 12:42] = torch.tensor([1.0, -2.0, 1.0])[:, None]  # each direction constant in block 1
    cases["constant direction"] = flat_dir
    for name, w in cases.items():
        proj = build_projection(w.clone(), SIZES, basis, bits)
        u = proj.dequantized()
        assert torch.isfinite(u).all(), name
        x = torch.randn(w.shape[0], len(SIZES))
        out = proj.reconstruct(x)
        assert torch.isfinite(out).all(), name
        assert torch.allclose(proj.reconstruct(torch.zeros_like(x)), w.mean(0), atol=1e-5), name
        assert torch.isfinite(proj.coef_grad(torch.randn(sum(SIZES)))).all(), name
    # all identical: every direction is dead, w(X) is the candidate for any X
    proj = build_projection(cases["all identical"].clone(), SIZES, basis, bits)
    assert torch.equal(proj.dequantized(), torch.zeros(3, sum(SIZES)))
    assert torch.allclose(proj.reconstruct(torch.randn(3, 3)), base[0])


def test_candidate_equal_to_center_gets_a_zero_direction():
    base = _cands(2, seed=9)
    w = torch.stack([base[0], base[1], (base[0] + base[1]) / 2])
    _, u = build_basis(w.clone(), SIZES, "normalized")
    assert torch.equal(u[2], torch.zeros(sum(SIZES)))
    _, u = build_basis(w.clone(), SIZES, "orthonormal")
    for a, b in _segments():
        assert int((u[:, a:b].norm(dim=1) > 0.5).sum()) == 1  # two candidates: a line


def test_duplicates_are_dropped_by_orthonormal_bases():
    base = _cands(3, seed=2)
    w = torch.stack([base[0], base[0], base[1], base[2]])
    _, u = build_basis(w.clone(), SIZES, "orthonormal")
    for a, b in _segments():
        norms = u[:, a:b].norm(dim=1)
        assert norms[1] == 0  # the duplicate of row 0
        assert int((norms > 0.5).sum()) == 2


def test_bad_basis_named():
    with pytest.raises(ValueError, match="basis 'pca'"):
        build_basis(_cands(), SIZES, "pca")


def test_coinciding_candidates_warn(caplog):
    base = _cands(2, seed=4)
    with caplog.at_level("WARNING", logger="twa_ray.core.subspace"):
        build_basis(base[0].repeat(3, 1), SIZES, "normalized")
    assert "all 3 candidates equal their center" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="twa_ray.core.subspace"):
        build_basis(torch.stack([base[0], base[0], base[1]]), SIZES, "normalized")
    assert "identical" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="twa_ray.core.subspace"):
        build_basis(_cands(4), SIZES, "normalized")
    assert caplog.text == ""
