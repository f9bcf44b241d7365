"""The TWA object in a plain PyTorch loop, SWA baseline, schedules, isolation from Ray."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import perturbed_candidates, tiny_mlp
from twa_ray.core import TWA, ScheduleSpec, apply_swa, flatten_params
from twa_ray.core.baselines import swa_vector
from twa_ray.core.params import ParamLayout, unflatten
from twa_ray.core.schedules import lr_factor, make_optimizer


def _problem(seed=0, n=256):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return x, y


def _sgd_candidates(model, x, y, n=5, epochs_between=3):
    """Candidates saved along a short SGD run (like base training)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    out = []
    for _ in range(n):
        for _ in range(epochs_between):
            for i in range(0, len(x), 32):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32]).backward()
                opt.step()
        out.append(flatten_params(model))
    return torch.stack(out)


def _loss(model, x, y):
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(x), y))


@pytest.mark.parametrize("basis,bits,optimizer", [("normalized", 8, "sgd"), ("orthonormal", 4, "adamw"), ("orthonormal-global", 32, "sgd")])
def test_short_twa_run_beats_the_swa_point(basis, bits, optimizer):
    x, y = _problem()
    model = tiny_mlp()
    cands = _sgd_candidates(model, x, y)
    steps = 60
    twa = TWA.from_candidates(
        model, cands, bits=bits, basis=basis, granularity="tensor", optimizer=optimizer,
        lr=0.05 if optimizer == "sgd" else 0.01, schedule=ScheduleSpec("cosine", steps),
    )
    swa_loss = _loss(model, x, y)  # the model starts at the SWA point
    assert torch.allclose(flatten_params(model), cands.mean(0), atol=1e-5)
    for s in range(steps):
        i = (s * 32) % len(x)
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32]).backward()
        twa.step()
    assert _loss(model, x, y) < swa_loss - 1e-3


class _EmptyParameter(nn.Module):
    """A layer whose parameter has no entries (e.g. a zero-width projection)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(0, 4))

    def forward(self, x):
        return x + self.weight.sum()


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 32])
@pytest.mark.parametrize("granularity", ["tensor", "model"])
def test_zero_size_parameter_gives_an_empty_block(bits, granularity):
    x, y = _problem()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), _EmptyParameter(), nn.Linear(12, 3))
    cands = perturbed_candidates(model, 4)
    twa = TWA.from_candidates(model, cands, bits=bits, granularity=granularity, lr=0.05)
    if granularity == "tensor":
        assert 0 in twa.projection.sizes  # the zero-size parameter is a block of its own
    for s in range(5):
        i = (s * 32) % len(x)
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32]).backward()
        twa.step()
    assert torch.isfinite(twa.X).all() and float(twa.X.detach().abs().sum()) > 0
    if granularity == "tensor":
        empty = twa.projection.sizes.index(0)
        assert torch.equal(twa.X.detach()[:, empty], torch.zeros(4))  # its gradient is an empty sum
    assert torch.equal(flatten_params(model), twa.weights())


def test_state_dict_resumes_exactly():
    x, y = _problem(1)
    cands = perturbed_candidates(tiny_mlp(), 4)

    def run(steps, resume_from=None, stop_at=None):
        model = tiny_mlp()
        twa = TWA.from_candidates(model, cands, bits=4, optimizer="sgd", lr=0.05, schedule=ScheduleSpec("cosine", steps, warmup_frac=0.2))
        start = 0
        if resume_from is not None:
            twa.load_state_dict(resume_from)
            start = twa.num_steps
        for s in range(start, stop_at or steps):
            i = (s * 16) % len(x)
            model.zero_grad()
            nn.functional.cross_entropy(model(x[i : i + 16]), y[i : i + 16]).backward()
            twa.step()
        return twa, flatten_params(model)

    full, w_full = run(20)
    half, _ = run(20, stop_at=9)
    state = half.state_dict()
    resumed, w_resumed = run(20, resume_from=state)
    assert resumed.num_steps == 20
    assert torch.equal(resumed.X, full.X)
    assert torch.equal(w_resumed, w_full)
    assert resumed.lr == full.lr


def test_from_state_dicts_and_errors():
    model = tiny_mlp()
    sds = [tiny_mlp(s).state_dict() for s in range(3)]
    twa = TWA.from_candidates(model, sds, bits=8)
    assert twa.X.shape == (3, len(list(model.parameters())))
    broken = dict(sds[1])
    broken.pop("0.weight")
    with pytest.raises(ValueError, match="candidate 1: missing parameter '0.weight'"):
        TWA.from_candidates(model, [sds[0], broken])
    bad = dict(sds[0])
    bad["2.bias"] = torch.full_like(bad["2.bias"], float("nan"))
    with pytest.raises(ValueError, match="candidate 1: parameter '2.bias' has non-finite"):
        TWA.from_candidates(model, [sds[0], bad])


def test_grad_clip_scales_the_coefficient_gradient():
    x, y = _problem(2)
    cands = perturbed_candidates(tiny_mlp(), 3)
    grads = []
    for clip in (None, 1e-3):
        model = tiny_mlp()
        twa = TWA.from_candidates(model, cands, bits=32, grad_clip=clip)
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        norm = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm()
        grads.append((twa.coefficient_grad(), float(norm)))
    (g0, norm), (g1, _) = grads
    assert torch.allclose(g1, g0 * 1e-3 / (norm + 1e-6), rtol=1e-5)


def test_swa_baseline_equals_averaged_model_and_update_bn():
    from torch.optim.swa_utils import AveragedModel, update_bn

    gen = torch.Generator().manual_seed(0)
    data = [torch.randn(8, 6, generator=gen) for _ in range(4)]
    cands = [tiny_mlp(s, bn=True) for s in range(4)]
    vectors = torch.stack([flatten_params(m) for m in cands])

    ref = AveragedModel(tiny_mlp(0, bn=True), use_buffers=False)
    for m in cands:
        ref.update_parameters(m)
    update_bn(data, ref)

    ours = apply_swa(tiny_mlp(9, bn=True), vectors, data)
    for (name, a), b in zip(ours.state_dict().items(), ref.module.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name
    assert torch.allclose(swa_vector(vectors), vectors.mean(0), atol=1e-7)


def test_schedules():
    spec = ScheduleSpec("cosine", 100, warmup_frac=0.1)
    assert lr_factor(0, spec) == pytest.approx(0.1)
    assert lr_factor(9, spec) == pytest.approx(1.0)
    assert lr_factor(10, spec) == pytest.approx(1.0)
    assert lr_factor(100, spec) == pytest.approx(0.0, abs=1e-9)
    assert lr_factor(55, spec) == pytest.approx(0.5, abs=1e-9)
    step = ScheduleSpec("step", 200, milestones=[0.5, 0.75], gamma=0.1)
    assert [lr_factor(s, step) for s in (0, 99, 100, 149, 150)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    lin = ScheduleSpec("linear", 10, final_factor=0.5)
    assert lr_factor(5, lin) == pytest.approx(0.75)
    swa = ScheduleSpec("swa", 100, swa_start=1.0, final_factor=0.05)
    assert [lr_factor(s, swa) for s in (0, 50, 70, 90, 99)] == pytest.approx([1, 1, 1 - 0.95 * 0.5, 0.05, 0.05])
    assert lr_factor(3, ScheduleSpec("constant", 10)) == 1.0
    with pytest.raises(ValueError, match="schedule 'poly'"):
        ScheduleSpec("poly", 10)
    with pytest.raises(ValueError, match="optimizer 'lion'"):
        make_optimizer([torch.zeros(1, requires_grad=True)], "lion", 0.1)


def test_core_exports_a_narrow_api():
    import inspect

    import twa_ray.core as core

    names = {"TWA", "ScheduleSpec", "recalibrate_bn", "apply_swa", "best_individual", "uniform_soup",
             "greedy_soup", "flatten_params"}
    assert set(core.__all__) == names
    public = {n for n, v in vars(core).items() if not n.startswith("_") and not inspect.ismodule(v)}
    assert public == names  # everything else is imported from its module


def test_core_does_not_import_ray():
    code = "import sys, twa_ray.core; bad = [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]; print(bad); sys.exit(1 if bad else 0)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_unflatten_round_trip(mlp):
    layout = ParamLayout.from_model(mlp)
    params = unflatten(flatten_params(mlp), layout)
    for name, p in mlp.named_parameters():
        assert torch.equal(params[name], p.detach())
