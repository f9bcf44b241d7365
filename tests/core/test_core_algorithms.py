"""Both published TWA algorithms against float64 re-derivations written here from the math.

Each reference below is a straightforward float64 implementation of one algorithm's update
(none of our kernels, bases or optimizers), run for 20 steps on a small MLP next to our
float32 TWA; after every step, coefficients and weights must agree to 1e-5 of how far the
20 steps moved them (the TWA displacement).

- journal (Li et al., TPAMI): c = mean w_i, u_il = (w_il - c_l) / ||w_il - c_l||, b-bit
  min-max quantised, w(X)_l = c_l + sum_i X_il Q_il from X = 0; SGD with momentum and
  weight decay on X.
- ICLR'23 (Li et al., "Trainable Weight Averaging"), as its code does it: P an orthonormal
  basis of the raw checkpoints (Gram-Schmidt in order), w starts at the mean, the last or a
  chosen checkpoint, and SGD with momentum runs on w itself with the gradient projected,
  d = P^T P g + wd * w. Our TWA runs it in coefficients; X = P w.
"""
import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call

from conftest import tiny_mlp
from test_core_twa import _problem, _sgd_candidates
from twa_ray.core import TWA, flatten_params

STEPS, BATCH, LR, MOMENTUM, WD = 20, 32, 0.1, 0.9, 5e-3
RTOL = 1e-5


def _sizes(model: nn.Module, granularity: str) -> list[int]:
    numels = [p.numel() for p in model.parameters()]
    return numels if granularity == "tensor" else [sum(numels)]


def _batch(x, y, step):
    i = (step * BATCH) % len(x)
    return x[i : i + BATCH], y[i : i + BATCH]


class _Grad64:
    """dLoss/dw in float64 at a flat w (D,) of the model's architecture."""

    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model).double()
        self.names = [n for n, _ in self.model.named_parameters()]
        self.shapes = [p.shape for p in self.model.parameters()]

    def __call__(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w = w.detach().clone().requires_grad_(True)
        params, pos = {}, 0
        for name, shape in zip(self.names, self.shapes):
            params[name] = w[pos : pos + shape.numel()].view(shape)
            pos += shape.numel()
        loss = nn.functional.cross_entropy(functional_call(self.model, params, (x.double(),)), y)
        (g,) = torch.autograd.grad(loss, w)
        return g


def _split(v: torch.Tensor, sizes):
    return list(v.split(sizes, dim=-1))


def _quantise64(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Min-max uniform quantisation of each row of u (n, m) to 2^b levels, dequantised."""
    lo = u.min(dim=1, keepdim=True).values
    scale = (u.max(dim=1, keepdim=True).values - lo) / (2**bits - 1)
    return lo + scale * torch.round((u - lo) / scale)


def _journal_reference(model, cands, sizes, bits, x, y, wd=WD):
    """X (n, L) and w (D,) after each step of the journal algorithm, in float64."""
    w64 = cands.double()
    c = w64.mean(0)
    q = []
    for d in _split(w64 - c, sizes):
        u = d / d.norm(dim=1, keepdim=True)
        q.append(u if bits == 32 else _quantise64(u, bits))
    grad = _Grad64(model)
    X = torch.zeros(w64.shape[0], len(sizes), dtype=torch.float64)
    buf = torch.zeros_like(X)
    out = []
    for step in range(STEPS):
        w = torch.cat([c_l + X[:, l] @ q_l for l, (c_l, q_l) in enumerate(zip(_split(c, sizes), q))])
        g = grad(w, *_batch(x, y, step))
        G = torch.stack([q_l @ g_l for q_l, g_l in zip(q, _split(g, sizes))], dim=1)
        buf = G + wd * X if step == 0 else MOMENTUM * buf + G + wd * X
        X = X - LR * buf
        out.append(X.clone())
    w = torch.cat([c_l + X[:, l] @ q_l for l, (c_l, q_l) in enumerate(zip(_split(c, sizes), q))])
    return out, w


def _gram_schmidt64(rows: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt of rows (n, m) in order, in float64 (QR with a positive diagonal): row i is
    row i's part orthogonal to the earlier ones, normalised. A block of m < n entries has m
    (the first ones, generically independent); the later rows are zero (dead directions)."""
    q, r = torch.linalg.qr(rows.T)
    out = torch.zeros_like(rows)
    out[: q.shape[1]] = (q * torch.sign(torch.diagonal(r))).T
    return out


def _iclr_reference(model, cands, sizes, start, x, y):
    """The ICLR'23 code's update on w in float64: (P w after each step, final w, start w)."""
    w64 = cands.double()
    P = [_gram_schmidt64(rows) for rows in _split(w64, sizes)]
    w = w64.mean(0) if start == "mean" else w64[-1 if start == "last" else start].clone()
    w_start = w.clone()
    grad = _Grad64(model)
    buf = torch.zeros_like(w)
    coords = []
    for step in range(STEPS):
        g = grad(w, *_batch(x, y, step))
        g_proj = torch.cat([P_l.T @ (P_l @ g_l) for P_l, g_l in zip(P, _split(g, sizes))])
        d = g_proj + WD * w
        buf = d if step == 0 else MOMENTUM * buf + d
        w = w - LR * buf
        coords.append(torch.stack([P_l @ w_l for P_l, w_l in zip(P, _split(w, sizes))], dim=1))
    x0 = torch.stack([P_l @ w_l for P_l, w_l in zip(P, _split(w_start, sizes))], dim=1)
    return coords, w, w_start, x0


def _run_ours(model, cands, x, y, **kwargs):
    twa = TWA.from_candidates(model, cands, lr=LR, momentum=MOMENTUM, weight_decay=WD, **kwargs)
    start_x, start_w = twa.X.detach().double().clone(), flatten_params(model).double()
    xs = []
    for step in range(STEPS):
        xb, yb = _batch(x, y, step)
        model.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        twa.step()
        xs.append(twa.X.detach().double().clone())
    return twa, xs, start_x, start_w, flatten_params(model).double()


def _assert_close(got, ref, moved, what):
    """|got - ref| <= RTOL * moved, ``moved`` = |final - start| of the reference run: relative
    to the TWA displacement. (Not to each step's own: X ~ |w| is stored in float32 for
    ``checkpoints``, whose rounding, ~1e-7 |X|, would dominate the first step's tiny move.)"""
    assert moved > 1e-2, f"{what}: training barely moved ({moved})"
    err = float((got - ref).norm())
    assert err <= RTOL * moved, f"{what}: off by {err / moved:.2e} of the displacement {moved:.3e}"


def _grid_candidates(model: nn.Module, bits: int) -> torch.Tensor:
    """Three candidates whose normalised directions quantise exactly at ``bits`` in every block.

    Center c and directions are dyadic (exact in float32), the mean is exactly c, and each
    block of each direction lies on its own 2^b-level grid with both ends hit, so float32 and
    float64 give the same codes (no entry sits near a rounding tie).
    """
    levels = 2**bits - 1
    eps = 2.0**-12
    gen = torch.Generator().manual_seed(3)
    c = torch.round(flatten_params(model) * 2**10) / 2**10
    k1, k2 = [], []
    for m in _sizes(model, "tensor"):
        a = torch.randint(0, levels + 1, (m,), generator=gen)
        b = torch.randint(0, (levels + 1) // 2, (m,), generator=gen) * 2 + a % 2  # a + b even
        a[:2], b[:2] = torch.tensor([0, levels]), torch.tensor([0, levels])  # both ends of every grid
        k1.append(a)
        k2.append(b)
    a = eps * (torch.cat(k1).double() - levels / 2)
    b = eps * (torch.cat(k2).double() - levels / 2)
    cands = torch.stack([c + a, c + b, c - a - b]).float()  # -(a + b) = eps * (levels - k1 - k2): step 2 eps
    assert torch.equal(cands.double().mean(0).float(), c)
    return cands


@pytest.mark.parametrize("bits", [8, 32])
def test_journal_algorithm_matches_its_float64_derivation(bits):
    x, y = _problem()
    model = tiny_mlp()
    cands = _grid_candidates(tiny_mlp(), bits) if bits < 32 else _sgd_candidates(tiny_mlp(), x, y)
    ref_xs, ref_w = _journal_reference(model, cands, _sizes(model, "tensor"), bits, x, y)
    twa, xs, start_x, start_w, w = _run_ours(model, cands, x, y, bits=bits, basis="normalized", granularity="tensor")
    assert torch.equal(start_x, torch.zeros_like(start_x))  # X = 0: the SWA point
    moved = float(ref_xs[-1].norm())
    for step, (got, ref) in enumerate(zip(xs, ref_xs)):
        _assert_close(got, ref, moved, f"X after step {step + 1}")
    _assert_close(w, ref_w, float((ref_w - cands.double().mean(0)).norm()), "weights")


@pytest.mark.parametrize("granularity", ["model", "tensor"])
@pytest.mark.parametrize("start", ["mean", "last", 2])
def test_iclr_algorithm_matches_its_float64_derivation(start, granularity):
    x, y = _problem()
    model = tiny_mlp()
    cands = _sgd_candidates(tiny_mlp(), x, y)
    sizes = _sizes(model, granularity)
    ref_xs, ref_w, ref_start, ref_x0 = _iclr_reference(model, cands, sizes, start, x, y)
    twa, xs, start_x, start_w, w = _run_ours(
        model, cands, x, y, bits=32, basis="checkpoints", granularity=granularity, start=start,
    )
    assert twa.X.shape == (len(cands), len(sizes))  # n dimensions per block, not n - 1
    assert torch.allclose(start_w, ref_start, rtol=0, atol=1e-6)  # the model starts at the start point
    assert (start_x - ref_x0).norm() <= 1e-6 * ref_x0.norm()
    moved = float((ref_xs[-1] - ref_x0).norm())
    for step, (got, ref) in enumerate(zip(xs, ref_xs)):
        _assert_close(got - start_x, ref - ref_x0, moved, f"X after step {step + 1}")
    _assert_close(w, ref_w, float((ref_w - ref_start).norm()), "weights")


def test_iclr_algorithm_quantised_uses_the_quantised_basis_exactly():
    """b < 32: the start point stays exact and the update is G = Q (g + wd * w) with the
    dequantised Q, momentum on X (checked against float64 with that Q)."""
    x, y = _problem()
    model = tiny_mlp()
    cands = _sgd_candidates(tiny_mlp(), x, y)
    sizes = _sizes(model, "tensor")
    twa, xs, start_x, start_w, w = _run_ours(model, cands, x, y, bits=8, basis="checkpoints", granularity="tensor",
                                             start="last")
    assert torch.allclose(start_w, cands[-1].double(), rtol=0, atol=1e-6)
    q = _split(twa.projection.dequantized().double(), sizes)
    c = twa.projection.center.double()
    grad = _Grad64(model)
    X, buf, ref_xs = start_x.clone(), torch.zeros_like(start_x), []
    for step in range(STEPS):
        w_ref = c + torch.cat([X[:, l] @ q_l for l, q_l in enumerate(q)])
        g = grad(w_ref, *_batch(x, y, step)) + WD * w_ref
        G = torch.stack([q_l @ g_l for q_l, g_l in zip(q, _split(g, sizes))], dim=1)
        buf = G if step == 0 else MOMENTUM * buf + G
        X = X - LR * buf
        ref_xs.append(X)
    moved = float((X - start_x).norm())
    for step, (got, ref) in enumerate(zip(xs, ref_xs)):
        _assert_close(got, ref, moved, f"X after step {step + 1}")
    ref_w = c + torch.cat([X[:, l] @ q_l for l, q_l in enumerate(q)])
    _assert_close(w, ref_w, float((ref_w - start_w).norm()), "weights")


def test_both_start_at_swa_and_differ_after_training_with_weight_decay():
    """orthonormal-global at X = 0 and checkpoints at start=mean are both the SWA point;
    trained alike with weight decay they part (by 14% of the displacement here): they are
    different algorithms (n - 1 centred dimensions and decay toward SWA, against n raw ones
    and decay toward 0)."""
    x, y = _problem()
    cands = _sgd_candidates(tiny_mlp(), x, y)
    swa = cands.double().mean(0)
    final = {}
    for basis in ("orthonormal-global", "checkpoints"):
        model = tiny_mlp()
        twa, xs, start_x, start_w, final[basis] = _run_ours(model, cands, x, y, bits=32, basis=basis,
                                                            granularity="model", start="mean")
        assert torch.allclose(start_w, swa, rtol=0, atol=1e-6), basis
        if basis == "orthonormal-global":
            assert torch.equal(start_x, torch.zeros_like(start_x))
        else:
            assert float(start_x.norm()) > 1.0  # the mean's coordinates in the raw span
    moved = float((final["orthonormal-global"] - swa).norm())
    apart = float((final["orthonormal-global"] - final["checkpoints"]).norm())
    assert apart > 0.1 * moved, (apart, moved)
