"""The Triton chunk kernels against their contract in torch (kernels_triton.reference_*), under the Triton
interpreter on CPU tensors.

triton.jit reads TRITON_INTERPRET when it decorates, and triton.language's own functions
(tl.sum, ...) are decorated when triton is first imported, which torch may already have
done in a test process (torch.compile, an optimizer step). So these tests run in a process
that imported triton under the interpreter: tests/core/test_kernels_triton_process.py starts
one with TRITON_INTERPRET=1; in any other process they are skipped, saying so.
"""
import importlib.util
import os
import sys

import pytest
import torch

from twa_ray.core import kernels_triton
from twa_ray.core.kernels_triton import (reference_grad, reference_reconstruct, triton_available, triton_grad,
                                         triton_reconstruct)

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed: its kernels can be neither compiled nor interpreted",
)
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="run in a fresh process under TRITON_INTERPRET=1 by test_kernels_triton_process.py",
)
BITS = [1, 2, 4, 8]
# B: one byte, odd sizes, more than one tile of bytes (tiles are powers of two)
COLS = [1, 37, 301]


@pytest.fixture
def interpret(monkeypatch):
    # triton.jit reads TRITON_INTERPRET when it decorates; kernels_triton decorates on first
    # use, once per mode, so setting it here (not before triton is imported) is enough
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _chunk(n, cols, bits, seed, integer=False):
    """raw (n, cols) uint8 (a column slice of a wider tensor, as the projection passes it),
    gt (per, cols) and w (n,); integer=True: values whose sums are exact in float32."""
    gen = torch.Generator().manual_seed(seed)
    per = 8 // bits
    raw = torch.randint(0, 256, (n, cols + 5), dtype=torch.uint8, generator=gen)[:, 3 : 3 + cols]
    inv = torch.tensor([2.0 ** (-k * bits) for k in range(per)])[:, None]  # the 2^(-k*b) of gt
    if integer:
        gt = torch.randint(-8, 9, (per, cols), generator=gen).float() * inv
        w = torch.randint(-8, 9, (n,), generator=gen).float()
    else:
        gt = torch.randn(per, cols, generator=gen) * inv
        w = torch.randn(n, generator=gen)
    return raw, gt, w


def _abs_grad(raw, gt, bits):
    """(n,) sum of |terms| of the gradient in float64: the scale of its rounding error."""
    per = 8 // bits
    masks = torch.tensor([((1 << bits) - 1) << (k * bits) for k in range(per)], dtype=torch.uint8)
    centre = torch.tensor([float((1 << (bits - 1)) << (k * bits)) for k in range(per)], dtype=torch.float64)
    codes = (raw[:, None, :] & masks[None, :, None]).double() - centre[None, :, None]  # (n, per, B)
    return (codes * gt.double()).abs().sum(dim=(1, 2))


def _abs_reconstruct(raw, w, bits):
    per = 8 // bits
    masks = torch.tensor([((1 << bits) - 1) << (k * bits) for k in range(per)], dtype=torch.uint8)
    codes = (raw[:, None, :] & masks[None, :, None]).double()  # (n, per, B)
    return (codes * w.double().abs()[:, None, None]).sum(dim=0)


# float32 rounding of sums of a few thousand terms, either order: a few ulps of sum |terms|
RTOL = 1e-6


@needs_triton
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [1, 7])
def test_match_eager_chunk_kernels(interpret, bits, n):
    for cols in COLS:
        # block_b=32: several tiles of bytes; block_n=2: several (and a partial) tiles of rows
        for tiles in ({}, {"block_n": 2, "block_b": 32}):
            raw, gt, w = _chunk(n, cols, bits, seed=bits * 100 + n * 10 + cols % 10)
            got = triton_grad(raw, gt, bits, **tiles)
            ref = reference_grad(bits)(raw, gt)
            assert got.shape == (n,) and got.dtype == torch.float32
            assert (got - ref).abs().le(RTOL * _abs_grad(raw, gt, bits)).all(), (cols, tiles, got, ref)
            got = triton_reconstruct(raw, w, bits, **tiles)
            ref = reference_reconstruct(bits)(raw, w)
            assert got.shape == (8 // bits, cols) and got.dtype == torch.float32
            assert (got - ref).abs().le(RTOL * _abs_reconstruct(raw, w, bits)).all(), (cols, tiles)


@needs_triton
@pytest.mark.parametrize("bits", BITS)
def test_exact_where_every_sum_is_exact(interpret, bits):
    # integer codes times small integers (gt's 2^(-k*b) cancels the codes' 2^(k*b)): every
    # sum is an exact float32 integer, in any order, so the kernels must agree bit for bit
    raw, gt, w = _chunk(7, 301, bits, seed=bits, integer=True)
    tiles = {"block_n": 4, "block_b": 64}
    assert torch.equal(triton_grad(raw, gt, bits, **tiles), reference_grad(bits)(raw, gt))
    assert torch.equal(triton_reconstruct(raw, w, bits, **tiles), reference_reconstruct(bits)(raw, w))


@needs_triton
def test_empty_chunks_and_bad_arguments(interpret):
    raw = torch.zeros(0, 5, dtype=torch.uint8)
    assert triton_grad(raw, torch.zeros(2, 5), 4).shape == (0,)
    assert torch.equal(triton_reconstruct(raw, torch.zeros(0), 4), torch.zeros(2, 5))
    raw = torch.zeros(3, 5, dtype=torch.uint8)
    with pytest.raises(ValueError, match="gt must be"):
        triton_grad(raw, torch.zeros(4, 5), 4)  # 4 bits: gt is (2, B)
    with pytest.raises(ValueError, match="bits must be"):
        triton_reconstruct(raw, torch.zeros(3), 32)
    with pytest.raises(ValueError, match="power of two"):
        triton_reconstruct(raw, torch.zeros(3), 4, block_b=48)


@needs_triton
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_available("cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        triton_grad(torch.zeros(2, 3, dtype=torch.uint8), torch.zeros(2, 3), 4)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_available("cpu")


def test_imports_without_triton_and_says_what_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    # a fresh copy of the module, imported while triton cannot be
    spec = importlib.util.spec_from_file_location("twa_ray.core._kernels_triton_copy", kernels_triton.__file__)
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    assert not fresh.triton_available()
    with pytest.raises(ImportError, match="needs the triton package"):
        fresh.require_triton()
    with pytest.raises(ImportError, match="needs the triton package"):
        fresh.triton_reconstruct(torch.zeros(1, 1, dtype=torch.uint8), torch.zeros(1), 4)
