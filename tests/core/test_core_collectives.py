"""Every tensor the core hands to a collective lives on the data's device (NCCL takes no CPU tensors).

On a CPU-only machine the data stays on the CPU and the default device for new tensors is
set to "meta": a tensor made without naming the data's device lands on "meta" and the
collectives double rejects it, as NCCL rejects a CPU tensor when the data is on a GPU.
"""
import pytest
import torch
from torch import nn

from conftest import perturbed_candidates, tiny_mlp
from twa_ray.core import TWA
from twa_ray.core.blocks import make_blocks
from twa_ray.core.collectives import Collectives
from twa_ray.core.params import ParamLayout
from twa_ray.core.projection import build_projection


class DeviceCheckingCollectives(Collectives):
    """One rank whose collectives raise unless every tensor is on ``device``; records all-reduces."""

    def __init__(self, num_params: int, device) -> None:
        self.rank, self.world_size, self.ranges = 0, 1, [(0, num_params)]
        self.device = torch.device(device)
        self.reduced: list[tuple[tuple[int, ...], torch.dtype]] = []

    def _check(self, op: str, t: torch.Tensor) -> None:
        if t.device != self.device:
            raise AssertionError(f"{op} got a tensor on {t.device}, the data is on {self.device}")

    def reduce_scatter_sum(self, flat):
        self._check("reduce_scatter_sum", flat)
        return flat

    def all_reduce_sum(self, t):
        self._check("all_reduce_sum", t)
        self.reduced.append((tuple(t.shape), t.dtype))
        return t

    def all_gather(self, own, out):
        self._check("all_gather", own)
        self._check("all_gather", out)
        return out.copy_(own)


@pytest.mark.parametrize("bits", [4, 32])
def test_global_basis_reduces_on_the_candidates_device(bits):
    sizes = [30, 50, 20]
    w = torch.randn(4, sum(sizes), generator=torch.Generator().manual_seed(0))
    expected = build_projection(w.clone(), sizes, "orthonormal-global", bits)
    comm = DeviceCheckingCollectives(sum(sizes), w.device)
    with torch.device("meta"):
        proj = build_projection(w.clone(), sizes, "orthonormal-global", bits, all_reduce=comm.all_reduce_sum)
    # the squared reference norm, then the Gram matrix of each of the two passes, all in float64
    assert comm.reduced == [((1,), torch.float64), ((4, 4), torch.float64), ((4, 4), torch.float64)]
    assert proj.data.device == w.device
    x = torch.randn(4, len(sizes))
    assert torch.equal(proj.reconstruct(x), expected.reconstruct(x))


@pytest.mark.parametrize("bits", [2, 32])
def test_twa_step_hands_collectives_tensors_on_the_model_device(bits):
    model = tiny_mlp()
    layout = ParamLayout.from_model(model)
    blocks = make_blocks(layout.numels, "tensor")
    comm = DeviceCheckingCollectives(layout.num_params, "cpu")
    proj = build_projection(perturbed_candidates(model, 3), blocks.sizes, "normalized", bits)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    with torch.device("meta"):
        twa = TWA(model, proj, len(blocks), collectives=comm, grad_clip=1.0, momentum=0.0)
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        twa.step()
    # the clipping norm (float64) and the coefficient gradient (float32) went through all_reduce
    assert comm.reduced == [((1,), torch.float64), (tuple(twa.X.shape), torch.float32)]
    assert twa.num_steps == 1 and torch.isfinite(twa.X).all()
