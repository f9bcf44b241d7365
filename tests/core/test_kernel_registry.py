"""The kernel registry: which kernels there are, how a name is checked and resolved (once,
when a Projection is built), that a kernel registered elsewhere runs without projection.py
knowing it, and the triton kernel's fallback, decided when a projection is built.
"""
import logging

import pytest
import torch

from twa_ray.core import TWA, kernels, kernels_triton
from twa_ray.core.kernels import KERNELS, EagerKernel, Kernel, NativeKernel, TritonKernel, resolve_kernel
from twa_ray.core.projection import Projection, build_projection

SIZES = [37, 5, 300, 1, 64, 9, 0, 3, 5000]  # odd sizes, grouped small blocks, an empty block, a chunked one


def _projection(bits=4, kernel="eager", basis="normalized", seed=0, n=5):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, sum(SIZES), generator=gen)
    proj = build_projection(w, SIZES, basis, bits, max_chunk_bytes=256, kernel=kernel)
    g = 0.5 + torch.randn(sum(SIZES), generator=gen)
    x = torch.randn(n, len(SIZES), generator=gen)
    return proj, g, x


def test_registry_lists_exactly_the_three_kernels():
    assert list(KERNELS) == ["eager", "native", "triton"]
    assert KERNELS == {"eager": EagerKernel, "native": NativeKernel, "triton": TritonKernel}
    assert all(issubclass(cls, Kernel) and cls.name == name for name, cls in KERNELS.items())
    assert kernels.kernel_names() == ("auto", "eager", "native", "triton")


def test_an_unknown_kernel_names_the_config_key_and_the_valid_ones():
    message = r"twa\.kernel: 'fast' is not one of \['auto', 'eager', 'native', 'triton'\]"
    with pytest.raises(ValueError, match=message):
        build_projection(torch.randn(3, 40), [40], "normalized", 4, kernel="fast")
    with pytest.raises(ValueError, match=message):  # at 32 bits too, where every kernel runs eager
        build_projection(torch.randn(3, 40), [40], "normalized", 32, kernel="fast")
    with pytest.raises(ValueError, match=message):
        resolve_kernel("fast", "cpu", 4)
    proj, _, _ = _projection()
    with pytest.raises(ValueError, match=message):
        proj.kernel = "fast"
    assert proj.kernel == "eager" and isinstance(proj.kernel_impl, EagerKernel)  # unchanged


@pytest.mark.parametrize("basis", ["normalized", "checkpoints"])
@pytest.mark.parametrize("bits", [4, 32])
def test_auto_is_resolved_once_per_projection_not_per_call(monkeypatch, basis, bits):
    calls = []
    resolve = kernels.kernel_class

    def spy(*args):
        calls.append(args)
        return resolve(*args)

    monkeypatch.setattr(kernels, "kernel_class", spy)
    proj, g, x = _projection(bits, kernel="auto", basis=basis)
    assert [(name, torch.device(dev).type, b) for name, dev, b in calls] == [("auto", "cpu", bits)]
    impl = proj.kernel_impl
    for _ in range(3):
        proj.coef_grad(g)
        proj.reconstruct(x)
        proj.reconstruct(x, torch.empty(2 * proj.numel)[::2])  # the non-contiguous path too
    assert len(calls) == 1 and proj.kernel_impl is impl
    moved = proj.to("cpu")  # a new projection: chosen again, once
    moved.coef_grad(g)
    assert len(calls) == 2
    proj.kernel = "eager"  # asking again chooses again, once
    proj.coef_grad(g)
    assert len(calls) == 3 and isinstance(proj.kernel_impl, EagerKernel)


class DenseKernel(Kernel):
    """A kernel made in a test, registered without touching projection.py: float64 sums
    over the dequantised projection, counting its calls."""

    name = "dense"
    calls: list[str] = []

    def __init__(self, proj):
        self.q = proj.dequantized().double()  # (n, m)
        self.seg = torch.repeat_interleave(torch.arange(proj.num_blocks), torch.tensor(proj.sizes))

    def coef_grad(self, proj, g):
        self.calls.append("coef_grad")
        dot = torch.zeros(proj.n, proj.num_blocks, dtype=torch.float64)
        return dot.index_add_(1, self.seg, self.q * g.double()).float()

    def reconstruct(self, proj, x, out):
        self.calls.append("reconstruct")
        return out.copy_(proj.center.double() + (x.double()[:, self.seg] * self.q).sum(dim=0))


def test_a_registered_kernel_class_is_used_by_a_projection(monkeypatch):
    """Adding a kernel is one class and its registry entry."""
    monkeypatch.setitem(KERNELS, "dense", DenseKernel)
    monkeypatch.setattr(DenseKernel, "calls", [])
    assert "dense" in kernels.kernel_names() and resolve_kernel("dense", "cpu", 4) == "dense"
    proj, g, x = _projection(kernel="dense")
    assert type(proj.kernel_impl) is DenseKernel
    got = proj.coef_grad(g), proj.reconstruct(x)
    assert DenseKernel.calls == ["coef_grad", "reconstruct"]
    proj.kernel = "eager"
    ref = proj.coef_grad(g), proj.reconstruct(x)
    assert torch.allclose(got[0], ref[0], rtol=1e-5, atol=1e-5 * ref[0].abs().max().item())
    assert torch.allclose(got[1], ref[1], rtol=1e-5, atol=1e-5)
    # through TWA as a user would ask for it
    model = torch.nn.Linear(3, 2)
    twa = TWA.from_candidates(model, torch.randn(3, 8), bits=4, kernel="dense")
    model(torch.randn(4, 3)).sum().backward()
    twa.step()
    assert type(twa.projection.kernel_impl) is DenseKernel and "coef_grad" in DenseKernel.calls


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def fake_triton(monkeypatch):
    """TritonKernel in this process without triton: its chunk kernels replaced by their
    contract in torch (or by ``fail``), a fresh per-process state, its warnings recorded."""
    state = {"fail": False, "launches": 0}

    def launch(reference):
        def kernel(raw, arg, bits):
            state["launches"] += 1
            if state["fail"]:
                raise RuntimeError("ptxas fatal: a compiler that does not work")
            return reference(bits)(raw, arg)
        return kernel

    monkeypatch.setattr(kernels_triton, "require_triton", lambda device="cuda": None)
    monkeypatch.setattr(kernels_triton, "triton_grad", launch(kernels_triton.reference_grad))
    monkeypatch.setattr(kernels_triton, "triton_reconstruct", launch(kernels_triton.reference_reconstruct))
    monkeypatch.setattr(TritonKernel, "_failure", None)
    monkeypatch.setattr(TritonKernel, "_warned", set())
    records = _Records()
    logger = logging.getLogger(kernels.triton.__name__)
    logger.addHandler(records)
    yield state, records
    logger.removeHandler(records)


def test_triton_kernel_runs_its_chunk_kernels(fake_triton):
    state, records = fake_triton
    proj, g, x = _projection(kernel="eager")
    ref = proj.coef_grad(g), proj.reconstruct(x)
    proj.kernel = "triton"
    assert type(proj.kernel_impl) is TritonKernel and state["launches"] == 2  # compiled when chosen
    got = proj.coef_grad(g), proj.reconstruct(x)
    assert state["launches"] > 2 and records.messages == []
    assert torch.allclose(got[0], ref[0], rtol=1e-5, atol=1e-5 * ref[0].abs().max().item())
    assert torch.allclose(got[1], ref[1], rtol=1e-5, atol=1e-5)


def test_triton_compile_failure_falls_back_when_built_and_warns_once(fake_triton):
    state, records = fake_triton
    state["fail"] = True
    proj, g, x = _projection(kernel="eager")
    ref = proj.coef_grad(g), proj.reconstruct(x)
    proj.kernel = "triton"
    assert type(proj.kernel_impl) is EagerKernel and state["launches"] == 1  # decided when built
    got = proj.coef_grad(g), proj.reconstruct(x)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    assert resolve_kernel("triton", "cpu", 4) == "eager"  # for the rest of the process
    other, _, _ = _projection(kernel="triton", seed=1)
    assert type(other.kernel_impl) is EagerKernel and state["launches"] == 1  # not tried again
    assert len(records.messages) == 1 and "ptxas fatal" in records.messages[0], records.messages


def test_triton_launch_failure_after_build_falls_back_once(fake_triton):
    state, records = fake_triton
    proj, g, x = _projection(kernel="triton")
    assert type(proj.kernel_impl) is TritonKernel
    state["fail"] = True
    eager = Projection(proj.center, proj.data, proj.sizes, 4, proj.scale, proj.offset, 256, "eager")
    got = proj.coef_grad(g), proj.reconstruct(x)
    assert torch.equal(got[0], eager.coef_grad(g)) and torch.equal(got[1], eager.reconstruct(x))
    launches = state["launches"]
    proj.coef_grad(g)
    assert state["launches"] == launches  # eager from the failure on
    assert len(records.messages) == 1 and "a triton projection kernel failed" in records.messages[0]


def test_triton_without_the_package_warns_once_and_runs_eager(monkeypatch, fake_triton):
    _, records = fake_triton

    def missing(device="cuda"):
        raise ImportError("the 'triton' projection kernel needs the triton package (No module named 'triton')")

    monkeypatch.setattr(kernels_triton, "require_triton", missing)
    for seed in range(2):
        proj, _, _ = _projection(kernel="triton", seed=seed)
        assert type(proj.kernel_impl) is EagerKernel
    assert len(records.messages) == 1 and "needs the triton package" in records.messages[0]
