"""Projection kernels against brute-force float references."""
import pytest
import torch
from torch import nn
from torch.func import functional_call

from conftest import perturbed_candidates, tiny_mlp
from twa_ray.core import TWA
from twa_ray.core.blocks import make_blocks, shard_blocks
from twa_ray.core.params import ParamLayout, unflatten
from twa_ray.core.projection import Projection, build_projection
from twa_ray.core.subspace import BASES, build_basis

GRANULARITIES = ["model", "tensor", "size:60"]


def _reference_blocks(sizes):
    pos = 0
    for m in sizes:
        yield pos, pos + m
        pos += m


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 32])
@pytest.mark.parametrize("chunk", [256, 1 << 20])
def test_kernels_match_dense_reference(bits, chunk):
    gen = torch.Generator().manual_seed(bits)
    sizes = [37, 5, 300, 1, 64, 9]  # odd sizes: padding bits, tiny and large blocks
    w = torch.randn(4, sum(sizes), generator=gen)
    proj = build_projection(w, sizes, "normalized", bits, max_chunk_bytes=chunk)
    p = proj.dequantized()  # (n, m)
    g = torch.randn(sum(sizes), generator=gen)
    x = torch.randn(4, len(sizes), generator=gen)
    ref_grad = torch.stack([p[:, a:b] @ g[a:b] for a, b in _reference_blocks(sizes)], dim=1)
    ref_w = proj.center.clone()
    for l, (a, b) in enumerate(_reference_blocks(sizes)):
        ref_w[a:b] += x[:, l] @ p[:, a:b]
    assert torch.allclose(proj.coef_grad(g), ref_grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(proj.reconstruct(x), ref_w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 4, 8, 32])
def test_packed_bytes_are_exact(bits):
    sizes = [37, 5, 300, 1, 64, 9]
    proj = build_projection(torch.randn(3, sum(sizes)), sizes, "orthonormal", bits)
    per_candidate = sum((m * bits + 7) // 8 for m in sizes)
    assert proj.nbytes == 3 * per_candidate


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_coefficient_gradient_equals_autograd(basis, granularity):
    """dLoss/dX through w = c + P^T X, by autograd, equals the projected gradient."""
    model = tiny_mlp()
    layout = ParamLayout.from_model(model)
    cands = perturbed_candidates(model, 5)
    twa = TWA.from_candidates(model, cands, bits=32, basis=basis, granularity=granularity)
    with torch.no_grad():
        twa.X.copy_(0.1 * torch.randn(twa.X.shape, generator=torch.Generator().manual_seed(3)))
    twa._write_weights()
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    got = twa.coefficient_grad()

    blocks = make_blocks(layout.numels, granularity)
    p = twa.projection.dequantized()
    xx = twa.X.detach().clone().requires_grad_(True)
    w = twa.projection.center.clone()
    parts = [w[a:b] + xx[:, l] @ p[:, a:b] for l, (a, b) in enumerate(zip(blocks.starts, blocks.ends))]
    params = unflatten(torch.cat(parts), layout)
    loss = nn.functional.cross_entropy(functional_call(model, params, (x,)), y)
    (ref,) = torch.autograd.grad(loss, xx)
    assert (got - ref).norm() <= 1e-5 * ref.norm()


@pytest.mark.parametrize("basis", ["normalized", "orthonormal"])
@pytest.mark.parametrize("bits", [4, 32])
def test_shards_add_up_to_the_whole(basis, bits):
    """Projection over a run of blocks equals the same slice of the full projection."""
    sizes = [40, 8, 120, 16, 33, 70]
    w = torch.randn(5, sum(sizes), generator=torch.Generator().manual_seed(7))
    full = build_projection(w.clone(), sizes, basis, bits, max_chunk_bytes=512)
    g = torch.randn(sum(sizes))
    x = torch.randn(5, len(sizes))
    grad_parts, w_parts = [], []
    for l0, l1 in shard_blocks(sizes, bits, 3):
        a, b = sum(sizes[:l0]), sum(sizes[:l1])
        shard = build_projection(w[:, a:b].clone(), sizes[l0:l1], basis, bits, max_chunk_bytes=512)
        grad_parts.append(shard.coef_grad(g[a:b]))
        w_parts.append(shard.reconstruct(x[:, l0:l1]))
    assert torch.allclose(torch.cat(grad_parts, dim=1), full.coef_grad(g), atol=1e-5)
    assert torch.allclose(torch.cat(w_parts), full.reconstruct(x), atol=1e-5)
    assert sum(1 for _ in shard_blocks(sizes, bits, 3)) == 3


def test_global_basis_built_from_shards_matches_the_whole():
    """orthonormal-global over 2 shards (Gram matrices summed across them) equals one process."""
    import threading

    sizes = [30, 50, 20, 40]
    w = torch.randn(4, sum(sizes), generator=torch.Generator().manual_seed(11))
    _, whole = build_basis(w.clone(), sizes, "orthonormal-global")
    runs = [(0, 2), (2, 4)]
    barrier = threading.Barrier(2)
    slots: list = [None, None]
    results: list = [None, None]

    def all_reduce(rank):
        def reduce(t):
            slots[rank] = t.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total
        return reduce

    def worker(rank):
        l0, l1 = runs[rank]
        a, b = sum(sizes[:l0]), sum(sizes[:l1])
        results[rank] = build_basis(w[:, a:b].clone(), sizes[l0:l1], "orthonormal-global", all_reduce(rank))[1]

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.allclose(torch.cat(results, dim=1), whole, atol=1e-5)
    gram = whole @ whole.T
    kept = gram.diagonal() > 0.5
    assert torch.allclose(gram[kept][:, kept], torch.eye(int(kept.sum())), atol=1e-5)


def test_projection_moves_between_devices_and_back():
    proj = build_projection(torch.randn(3, 50), [20, 30], "normalized", 4)
    moved = proj.to("cpu")
    assert isinstance(moved, Projection)
    assert torch.equal(moved.reconstruct(torch.ones(3, 2)), proj.reconstruct(torch.ones(3, 2)))


def _float64_coef_grad(proj, g):
    """<Q_il, g[B_l]> (n, L) in float64 from the stored codes, scales and offsets."""
    from twa_ray.core.quant import packed_bytes, unpack_bits

    out, col = [], 0
    for l, (a, b) in enumerate(_reference_blocks(proj.sizes)):
        if proj.bits == 32:
            q = proj.data[:, a:b].double()
        else:
            nb = packed_bytes(b - a, proj.bits)
            codes = unpack_bits(proj.data[:, col : col + nb], proj.bits, b - a).double()
            q = proj.offset[:, l : l + 1].double() + proj.scale[:, l : l + 1].double() * codes
            col += nb
        out.append(q @ g[a:b].double())
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 32])
@pytest.mark.parametrize("sizes", [[200_000], [3_000, 200_000, 70]])
def test_coefficient_gradient_keeps_its_digits_when_the_gradient_has_a_mean(bits, sizes):
    """With non-negative codes, scale * <codes, g> and offset * sum(g) are large and nearly
    cancel when g has a mean; the kernel must still match float64 (it was off by 4e-4)."""
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(6, sum(sizes), generator=gen)
    proj = build_projection(w, sizes, "normalized", bits)
    g = 1.0 + torch.randn(sum(sizes), generator=gen)  # mean 1
    ref = _float64_coef_grad(proj, g)
    err = float((proj.coef_grad(g).double() - ref).norm() / ref.norm())
    assert err <= 1e-5, err
