"""On a CUDA device: the projection kernels against the CPU's, TWA's step and collectives on
GPU tensors, and two NCCL ranks against one process.

Marked ``gpu``: skipped without CUDA (tests/conftest.py); ``benchmarks/gpu_check.py`` runs
them on a machine with a GPU. The two-rank test also needs two GPUs.
"""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import perturbed_candidates, tiny_mlp
from twa_ray.core import TWA, flatten_params
from twa_ray.core.blocks import make_blocks, plan_shards
from twa_ray.core.collectives import LocalCollectives
from twa_ray.core.params import ParamLayout
from twa_ray.core.projection import KERNELS, build_projection, resolve_kernel
from twa_ray.parallel.exchanges import ShardedExchange
from twa_ray.parallel.local_ranks import spawn_ranks

pytestmark = pytest.mark.gpu

SIZES = [3000, 37, 5, 20000, 1, 640, 9, 70000]  # blocks cut into chunks, small blocks grouped, padding


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest difference relative to the reference's largest value (both moved to the CPU)."""
    got, ref = got.detach().cpu(), ref.detach().cpu()
    return float((got - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 32])
@pytest.mark.parametrize("kernel", KERNELS)
def test_projection_kernels_on_cuda_match_the_cpu_eager_kernels(kernel, bits):
    try:
        resolve_kernel(kernel, "cuda", bits)
    except ValueError as exc:
        pytest.skip(f"kernel {kernel!r} does not run on CUDA: {exc}")
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(6, sum(SIZES), generator=gen)
    cpu = build_projection(w, SIZES, "normalized", bits, max_chunk_bytes=1 << 16, kernel="eager")
    gpu = cpu.to("cuda")
    gpu.kernel = kernel
    assert gpu.data.is_cuda and gpu.center.is_cuda
    g = torch.randn(sum(SIZES), generator=gen)
    x = torch.randn(6, len(SIZES), generator=gen)
    got_g, got_w = gpu.coef_grad(g.cuda()), gpu.reconstruct(x.cuda())
    assert got_g.is_cuda and got_w.is_cuda
    assert rel_err(got_g, cpu.coef_grad(g)) < 1e-5
    assert rel_err(got_w, cpu.reconstruct(x)) < 1e-5


@pytest.mark.parametrize("basis", ["normalized", "orthonormal", "orthonormal-global", "checkpoints"])
@pytest.mark.parametrize("bits", [4, 32])
def test_projection_built_on_cuda_matches_the_cpu(basis, bits):
    gen = torch.Generator().manual_seed(3)
    w = 1.0 + 0.1 * torch.randn(5, sum(SIZES), generator=gen)  # candidates around a common point
    cpu = build_projection(w.clone(), SIZES, basis, bits)
    gpu = build_projection(w.cuda(), SIZES, basis, bits)
    assert gpu.data.is_cuda and gpu.center.is_cuda
    if basis == "checkpoints":  # X starts at X0 with w(X0) = the candidates' mean, on either device
        assert rel_err(gpu.reconstruct(gpu.start), cpu.reconstruct(cpu.start)) < 1e-5
    else:
        assert rel_err(gpu.center, cpu.center) < 1e-5
    ref, got = cpu.dequantized(), gpu.dequantized().cpu()
    if bits == 32:
        assert rel_err(got, ref) < 1e-4
    else:  # a value on a rounding boundary may take the neighbouring code: rare, never systematic
        assert float((got - ref).abs().gt(1e-4 * ref.abs().max()).float().mean()) < 1e-3


def projection_for(model: nn.Module, candidates: torch.Tensor, basis: str, bits: int):
    """The projection over one block per tensor, built on the CPU (so the CPU and the GPU run
    share the same codes), and the number of blocks."""
    blocks = make_blocks(ParamLayout.from_model(model).numels, "tensor")
    return build_projection(candidates.clone(), blocks.sizes, basis, bits), len(blocks)


@pytest.mark.parametrize("basis", ["normalized", "checkpoints"])
def test_twa_steps_on_cuda_match_the_cpu(basis):
    """TWA with its default one-process collectives (LocalCollectives) on CUDA tensors:
    gradient clipping (an all-reduce of the norm) and weight decay included."""
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(64, 6, generator=gen), torch.randint(0, 3, (64,), generator=gen)
    results = {}
    for device in ("cpu", "cuda"):
        model = tiny_mlp(bn=True)
        proj, num_blocks = projection_for(model, perturbed_candidates(model, 5), basis, 4)
        model.to(device)
        twa = TWA(model, proj.to(device), num_blocks, lr=0.1, weight_decay=1e-3, grad_clip=1.0)
        assert isinstance(twa.comm, LocalCollectives)
        for _ in range(10):
            model.zero_grad()
            nn.functional.cross_entropy(model(x.to(device)), y.to(device)).backward()
            twa.step()
        assert twa.X.device.type == device and next(model.parameters()).device.type == device
        results[device] = (twa.X.detach().cpu(), flatten_params(model).cpu())
    assert rel_err(results["cuda"][0], results["cpu"][0]) < 1e-4
    assert rel_err(results["cuda"][1], results["cpu"][1]) < 1e-5


def test_one_rank_collectives_keep_cuda_tensors_on_the_gpu():
    for comm in (LocalCollectives(10), ShardedExchange([(0, 10)], 0, 1)):
        g = torch.arange(10.0, device="cuda")
        own = comm.reduce_scatter_sum(g)
        assert own.is_cuda and torch.equal(own, g)
        t = torch.ones(3, 4, device="cuda")
        assert comm.all_reduce_sum(t) is t
        out = torch.empty(10, device="cuda")
        assert comm.all_gather(own * 2, out) is out and torch.equal(out, 2 * g)


# ---------------------------------------------------------------- two NCCL ranks

STEPS, BATCH = 10, 64


def sharded_run(rank: int, world: int, basis: str, bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """TWA over rank ``rank``'s column shard (as the runtime builds it), ``STEPS`` steps on
    its part of one global batch; (X, full weights) on the CPU. ``world`` 1: one process."""
    model = tiny_mlp()  # no BatchNorm: each rank's batch statistics would differ from the global batch's
    candidates = perturbed_candidates(model, 5)
    layout = ParamLayout.from_model(model)
    blocks = make_blocks(layout.numels, "tensor")
    plan = plan_shards(blocks, bits, world)
    (start, end), (l0, l1) = plan.ranges[rank], plan.block_runs[rank]
    comm = LocalCollectives(layout.num_params) if world == 1 else ShardedExchange(plan.ranges, rank, world)
    proj = build_projection(candidates[:, start:end].to(device), blocks.sizes[l0:l1], basis, bits,
                            all_reduce=comm.all_reduce_sum)
    model.to(device)
    twa = TWA(model, proj, len(blocks), (l0, l1), collectives=comm, lr=0.1)
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(BATCH, 6, generator=gen), torch.randint(0, 3, (BATCH,), generator=gen)
    mine = list(range(rank, BATCH, world))
    xs, ys = x[mine].to(device), y[mine].to(device)
    for _ in range(STEPS):
        model.zero_grad()
        (nn.functional.cross_entropy(model(xs), ys) * len(mine) / BATCH).backward()  # summed: the global mean
        twa.step()
    return twa.X.detach().cpu(), flatten_params(model).cpu()


def nccl_rank(rank: int, world: int, basis: str, bits: int, out: str) -> None:
    x, w = sharded_run(rank, world, basis, bits, torch.device("cuda", rank))
    Path(out, f"rank{rank}.json").write_text(json.dumps({"X": x.tolist(), "w": w.tolist()}))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs: one GPU cannot hold two NCCL ranks")
@pytest.mark.parametrize("basis, bits", [("normalized", 8), ("orthonormal-global", 32)])
def test_two_nccl_ranks_reach_the_one_process_weights(tmp_path, basis, bits):
    """Column shards on two GPUs over NCCL (orthonormal-global all-reduces its Gram matrix
    across them) reach the coefficients and weights of one process on one GPU."""
    spawn_ranks(nccl_rank, 2, basis, bits, str(tmp_path), backend="nccl")
    ref_x, ref_w = sharded_run(0, 1, basis, bits, torch.device("cuda", 0))
    for rank in range(2):
        got = json.loads(Path(tmp_path, f"rank{rank}.json").read_text())
        assert rel_err(torch.tensor(got["X"]), ref_x) < 1e-5
        assert rel_err(torch.tensor(got["w"]), ref_w) < 1e-5
