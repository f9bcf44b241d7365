"""The projection's kernels against each other: native (C++, every code path this CPU
runs) and triton (under the Triton interpreter) against eager, eager and native against
float64 references; how ``kernel`` chooses between them.

The native module is built on first use (``twa_ray.core.native``); the tests skip, saying
why, only where the build tools are missing. A failed build with the tools present fails.
"""
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from twa_ray.config import ConfigError, config_from_dict
from twa_ray.core import TWA, native
from twa_ray.core.projection import KERNELS, SUM_PIECE, Projection, build_projection, resolve_kernel
from twa_ray.core.quant import packed_bytes, unpack_bits

ROOT = Path(__file__).resolve().parents[2]
PACKED_BITS = [1, 2, 4, 8]
TILE = 4096  # the native kernels' tile (elements): the cases below cross it
# odd sizes (padding bits), tiny and grouped blocks, an empty block, blocks of several
# native tiles and of several eager pieces (SUM_PIECE) and chunks
SIZES = {
    "odd": [37, 5, 300, 1, 64, 9, 0, 3],
    "tiles": [TILE - 1, TILE, TILE + 1, 2 * TILE + 33, 17],
    "grouped": [40, 8, 120, 16, 33, 70, 1000, 2, 5000],
    "pieces": [SUM_PIECE + 7, 3, 2 * SUM_PIECE - 5],
}
# max_chunk_bytes: eager chunks of 64 elements (many chunk boundaries) and the default
CHUNKS = [256, 8 << 20]


@pytest.fixture(scope="module")
def native_module():
    missing = native.missing_tools()
    if missing:
        pytest.skip(f"the native kernels cannot be built on this machine: missing {', '.join(missing)}")
    module = native.load()
    assert module is not None, f"native build failed with the build tools present: {native.build_error()}"
    return module


def _isas():
    """The native code paths this CPU runs: portable everywhere, AVX2 and AVX-512 where it has them."""
    best = native.isa()
    return ["portable", "avx2", "avx512"][: 1 + ["portable", "avx2", "avx512"].index(best)]


def _projection(sizes, bits, chunk, seed, n=5):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, sum(sizes), generator=gen)
    proj = build_projection(w, sizes, "normalized", bits, max_chunk_bytes=chunk, kernel="eager")
    g = 0.5 + torch.randn(sum(sizes), generator=gen)  # a mean: the centring matters
    x = torch.randn(n, len(sizes), generator=gen)
    return proj, g, x


def _sizes(proj):
    """The block sizes as the native functions take them: (L,) int64 on the CPU."""
    return torch.tensor(proj.sizes, dtype=torch.int64)


def _centred_codes(proj):
    """(n, m) float64 code - 2^(b-1) of every element."""
    parts, col = [], 0
    for m in proj.sizes:
        nb = packed_bytes(m, proj.bits)
        parts.append(unpack_bits(proj.data[:, col : col + nb], proj.bits, m).double() - (1 << (proj.bits - 1)))
        col += nb
    return torch.cat(parts, dim=1)


def _dequantised(proj):
    """(n, m) float64 Q from the stored codes, scales and offsets, and its (n, m) |terms|
    scale: |middle| + |scale| * |code - 2^(b-1)| (what float32 rounding is measured against)."""
    seg = torch.repeat_interleave(torch.arange(len(proj.sizes)), torch.tensor(proj.sizes))
    scale, codes = proj.scale.double()[:, seg], _centred_codes(proj)
    middle = proj.offset.double()[:, seg] + scale * (1 << (proj.bits - 1))
    return middle + scale * codes, middle.abs() + scale.abs() * codes.abs(), seg


@pytest.fixture
def force_isa(monkeypatch):
    """Make Projection's native calls (isa "auto") run the given code path."""
    def force(isa):
        monkeypatch.setitem(native.ISAS, "auto", native.ISAS[isa])
    return force


@pytest.mark.parametrize("bits", PACKED_BITS)
@pytest.mark.parametrize("case", list(SIZES))
def test_native_matches_eager(native_module, force_isa, bits, case):
    """coef_grad and reconstruct of the native kernels, every code path this CPU runs,
    against the eager ones (small chunks: many chunk boundaries and grouped blocks), to
    float32 rounding of the sums' terms."""
    sizes = SIZES[case]
    proj, g, x = _projection(sizes, bits, 256, seed=bits + 10 * len(sizes))
    ref_grad, ref_w = proj.coef_grad(g).double(), proj.reconstruct(x).double()  # eager
    _, terms, seg = _dequantised(proj)
    grad_scale = torch.zeros(proj.n, len(sizes), dtype=torch.float64).index_add_(1, seg, terms * g.double().abs())
    w_scale = proj.center.double().abs() + (x.double().abs()[:, seg] * (terms + proj.offset.double().abs()[:, seg])).sum(dim=0)
    proj.kernel = "native"
    for isa in _isas():
        force_isa(isa)
        grad = proj.coef_grad(g).double()
        assert ((grad - ref_grad).abs() <= 1e-6 * grad_scale).all(), (isa, (grad - ref_grad).abs().max())
        w = proj.reconstruct(x, torch.full_like(proj.center, float("nan"))).double()
        assert ((w - ref_w).abs() <= 1e-6 * w_scale).all(), (isa, (w - ref_w).abs().max())


@pytest.mark.parametrize("bits", PACKED_BITS)
@pytest.mark.parametrize("n", [1, 9, 12, 17, 25])
def test_native_row_groups_match_eager(native_module, force_isa, bits, n):
    """Candidate counts that the native code splits into row groups of unequal sizes
    (n = 9, 17: groups of 3-6 rows; one row), the AVX-512 reconstruction's largest group
    (n = 12) and groups before its last, fused one (17, 25), every code path, against eager."""
    sizes = [TILE + 5, 300, 1]
    proj, g, x = _projection(sizes, bits, 8 << 20, seed=n + bits, n=n)
    ref_grad, ref_w = proj.coef_grad(g).double(), proj.reconstruct(x).double()
    proj.kernel = "native"
    for isa in _isas():
        force_isa(isa)
        grad = proj.coef_grad(g).double()
        assert torch.allclose(grad, ref_grad, rtol=1e-5, atol=1e-5 * ref_grad.abs().max().item()), isa
        assert torch.allclose(proj.reconstruct(x).double(), ref_w, rtol=1e-5, atol=1e-5), isa


def test_native_streamed_weights_match_stored(native_module):
    """A run of weights of at least STREAM_BYTES is written with non-temporal stores where
    the output is 64-byte aligned: same values as the plain stores of a misaligned output."""
    m = native_module.STREAM_BYTES // 4 + 37
    proj, _, x = _projection([m - 4100, 4100], 4, 8 << 20, seed=6, n=2)
    weights, base = (x * proj.scale).t().contiguous(), torch.randn(2)
    aligned = torch.empty(m + 16)[:m]
    shifted = torch.empty(m + 16)[1 : m + 1]
    assert aligned.data_ptr() % 64 == 0 and shifted.data_ptr() % 64 != 0
    for out in (aligned, shifted):
        native.reconstruct(proj.data, weights, base, proj.center, _sizes(proj), 4, out)
    assert torch.equal(aligned, shifted)
    proj.kernel = "eager"
    ref = proj.reconstruct(x)
    proj.kernel = "native"
    assert torch.allclose(proj.reconstruct(x), ref, rtol=1e-5, atol=1e-5)


def test_native_code_sums_are_exact(native_module):
    """The per-tile sums of the centred codes the native coef_grad adds mean_t times."""
    assert native_module.TILE == TILE <= SUM_PIECE  # a tile's float32 sum is one piece
    sizes = SIZES["tiles"] + SIZES["odd"]
    for bits in PACKED_BITS:
        proj, _, _ = _projection(sizes, bits, 8 << 20, seed=bits)
        codes, ref, pos = _centred_codes(proj), [], 0
        for m in sizes:
            ref += [codes[:, pos + a : pos + min(m, a + TILE)].sum(dim=1) for a in range(0, m, TILE)]
            pos += m
        assert torch.equal(native.code_sums(proj.data, _sizes(proj), bits).double(), torch.stack(ref)), bits


@pytest.mark.parametrize("bits", PACKED_BITS)
@pytest.mark.parametrize("chunk", CHUNKS)
def test_kernels_match_float64_reference(native_module, bits, chunk):
    """coef_grad and reconstruct of eager and native (Projection's kernel) against float64
    sums over the dequantised projection."""
    sizes = SIZES["tiles"] + SIZES["odd"]
    proj, g, x = _projection(sizes, bits, chunk, seed=bits)
    q, _, seg = _dequantised(proj)
    ref_grad = torch.zeros(proj.n, len(sizes), dtype=torch.float64).index_add_(1, seg, q * g.double())
    ref_w = proj.center.double() + (x.double()[:, seg] * q).sum(dim=0)
    for kernel in ("eager", "native"):
        proj.kernel = kernel
        grad = proj.coef_grad(g).double()
        assert (grad - ref_grad).norm() <= 1e-5 * ref_grad.norm(), kernel
        assert torch.allclose(proj.reconstruct(x).double(), ref_w, rtol=1e-5, atol=1e-5), kernel


def test_native_results_do_not_depend_on_the_thread_count(native_module):
    proj, g, x = _projection([70_000, 3, 50_000], 4, 8 << 20, seed=3, n=7)
    sums = native.code_sums(proj.data, _sizes(proj), 4)
    weights, base = (x * proj.scale).t().contiguous(), torch.randn(3)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            dot, g_sum = native.coef_grad(proj.data, g, _sizes(proj), sums, 4)
            out = native.reconstruct(proj.data, weights, base, proj.center, _sizes(proj), 4, torch.empty(g.shape))
            results.append((dot, g_sum, out, native.code_sums(proj.data, _sizes(proj), 4)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_native_kernel_checks_its_tensors(native_module):
    proj, g, _ = _projection([100, 20], 4, 8 << 20, seed=4)
    sizes = _sizes(proj)  # held: the last call takes its pointer
    sums = native.code_sums(proj.data, sizes, 4)
    with pytest.raises(ValueError, match="g: expected"):
        native.coef_grad(proj.data, g[:-1], sizes, sums, 4)
    with pytest.raises(ValueError, match="data: expected"):
        native.coef_grad(proj.data[:, 1:], g, sizes, sums, 4)
    with pytest.raises(ValueError, match="sums: expected"):
        native.coef_grad(proj.data, g, sizes, sums[:, 1:], 4)
    with pytest.raises(ValueError, match="bits must be"):
        native_module.coef_grad(proj.data.data_ptr(), 5, proj.data.shape[1], g.data_ptr(), sizes.data_ptr(),
                                2, sums.data_ptr(), 3, 0, 0, 1, 0)


def test_auto_is_native_on_cpu_and_eager_at_32_bits(native_module):
    assert resolve_kernel("auto", "cpu", 4) == "native"
    assert resolve_kernel("auto", "cpu", 32) == "eager"
    assert resolve_kernel("native", "cpu", 32) == "eager"  # float kernels at 32 bits
    assert resolve_kernel("auto", "cuda", 4) == "eager"  # triton is opt-in until measured
    assert Projection(torch.zeros(8), torch.zeros(2, 4, dtype=torch.uint8), [8], 4,
                      torch.ones(2, 1), torch.zeros(2, 1)).kernel == "auto"


def test_kernel_choice_errors():
    with pytest.raises(ValueError, match=r"twa\.kernel: 'compiled' is not one of \['auto', 'eager', 'native', 'triton'\]"):
        resolve_kernel("compiled", "cpu", 4)
    with pytest.raises(ValueError, match="runs on CPU tensors"):
        resolve_kernel("native", "cuda", 4)
    with pytest.raises(ValueError, match="is not one of"):
        build_projection(torch.randn(3, 40), [40], "normalized", 4, kernel="fast")


class _Records(logging.Handler):
    """The records of one logger (the package's logger may not propagate to caplog's)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_failed_native_build_warns_once_and_runs_eager(monkeypatch):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_build", lambda: (None, "missing C++ compiler 'c++'"))
    proj, g, x = _projection([300, 7], 2, 8 << 20, seed=5)
    expected = proj.coef_grad(g), proj.reconstruct(x)
    records = _Records()
    native.log.addHandler(records)
    try:
        proj.kernel = "native"  # chosen here, once: the build is tried and fails
        assert proj.kernel_impl.name == "eager"
        assert resolve_kernel("native", "cpu", 2) == "eager" and resolve_kernel("auto", "cpu", 2) == "eager"
        got = proj.coef_grad(g), proj.reconstruct(x)
    finally:
        native.log.removeHandler(records)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert len(records.records) == 1, [r.getMessage() for r in records.records]
    assert "native projection kernels unavailable" in records.records[0].getMessage()
    assert "missing C++ compiler" in records.records[0].getMessage()


_TRITON_SCRIPT = """
import json, torch
from twa_ray.core.kernels import TritonKernel
from twa_ray.core.projection import build_projection, resolve_kernel
out = {}
for bits in (1, 2, 4, 8):
    gen = torch.Generator().manual_seed(bits)
    sizes = [37, 5, 300, 1, 64, 9]
    proj = build_projection(torch.randn(5, sum(sizes), generator=gen), sizes, "normalized", bits,
                            max_chunk_bytes=256, kernel="eager")
    g, x = 0.5 + torch.randn(sum(sizes), generator=gen), torch.randn(5, len(sizes), generator=gen)
    expected = proj.coef_grad(g), proj.reconstruct(x)
    proj.kernel = "triton"
    got = proj.coef_grad(g), proj.reconstruct(x)
    out[bits] = [resolve_kernel("triton", "cpu", bits), proj.kernel_impl.name, TritonKernel._failure,
                 bool(torch.allclose(got[0], expected[0], rtol=1e-5, atol=1e-5)),
                 bool(torch.allclose(got[1], expected[1], rtol=1e-5, atol=1e-5))]
print(json.dumps(out))
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernel_in_the_projection_matches_eager():
    """kernel="triton" through Projection's chunk loop, under the Triton interpreter on CPU
    tensors. In a fresh process: triton.jit reads TRITON_INTERPRET when it decorates, and
    triton.language's own functions are decorated when triton is first imported, which
    torch may already have done in this one (an optimizer step imports it)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    # [kernel chosen, kernel that ran, why triton failed, coef_grad matches, reconstruct matches] per width
    assert results == {str(b): ["triton", "triton", None, True, True] for b in PACKED_BITS}, results


def test_config_key_chooses_the_kernel():
    raw = {"train": {"epochs": 2}}
    assert "auto" in KERNELS and config_from_dict(raw, "cfg").twa.kernel == "auto"
    assert config_from_dict(raw, "cfg", ["twa.kernel=eager"]).twa.kernel == "eager"
    with pytest.raises(ConfigError, match=r"twa\.kernel: 'compiled' is not one of"):
        config_from_dict(raw, "cfg", ["twa.kernel=compiled"])
    model = torch.nn.Linear(3, 2)
    twa = TWA.from_candidates(model, torch.randn(3, 8), bits=4, kernel="eager")
    assert twa.projection.kernel == "eager"
