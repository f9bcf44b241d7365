"""The ``checkpoints`` basis (ICLR'23) beyond its update: start points, degenerate and
sharded candidates, errors; the paper's step schedule; the config keys that choose them."""
import threading

import pytest
import torch
from torch import nn

from conftest import perturbed_candidates, tiny_mlp
from test_core_collectives import DeviceCheckingCollectives
from test_core_twa import _loss, _problem, _sgd_candidates
from twa_ray.config import ConfigError, TWAConfig, check_twa_start, config_from_dict
from twa_ray.core import TWA, ScheduleSpec, flatten_params
from twa_ray.core.blocks import make_blocks, shard_blocks
from twa_ray.core.params import ParamLayout
from twa_ray.core.projection import build_projection
from twa_ray.core.schedules import lr_factor, make_optimizer, make_scheduler, paper_milestones

SIZES = [12, 30, 5]


def _cands(n=4, seed=0, offset=1.0):
    """Candidates with a common part (as checkpoints of one run have), so the raw span is not the centred one."""
    gen = torch.Generator().manual_seed(seed)
    return offset * torch.randn(1, sum(SIZES), generator=gen) + 0.3 * torch.randn(n, sum(SIZES), generator=gen)


@pytest.mark.parametrize("bits", [1, 4, 8, 32])
@pytest.mark.parametrize("start", ["mean", "last", 0, 2])
def test_start_point_is_exact_at_every_bit_width(start, bits):
    w = _cands()
    proj = build_projection(w.clone(), SIZES, "checkpoints", bits, start=start)
    expected = w.double().mean(0).float() if start == "mean" else w[-1 if start == "last" else start]
    assert proj.start.shape == (4, len(SIZES))
    assert torch.allclose(proj.reconstruct(proj.start), expected, rtol=0, atol=2e-6)


def test_first_candidate_has_one_coordinate_per_block():
    """Gram-Schmidt in candidate order: u_0l = w_0l / |w_0l|, so w_0's coordinates are (|w_0l|, 0, ...)."""
    w = _cands()
    proj = build_projection(w.clone(), SIZES, "checkpoints", 32, start=0)
    norms = torch.stack([part.norm() for part in w[0].split(SIZES)])
    assert torch.allclose(proj.start[0], norms, rtol=1e-6)
    assert proj.start[1:].abs().max() < 1e-5
    u = proj.dequantized()
    for a, b in zip([0, 12, 42], [12, 42, 47]):
        assert torch.allclose(u[:, a:b] @ u[:, a:b].T, torch.eye(4), atol=1e-5)  # n dimensions per block


def test_a_given_center_is_the_start_even_outside_the_span():
    """Candidates in rounds: round t starts at round t-1's solution, which the raw span need not hold."""
    w = _cands(3)
    previous = torch.randn(sum(SIZES), generator=torch.Generator().manual_seed(8))
    for bits in (4, 32):
        proj = build_projection(w.clone(), SIZES, "checkpoints", bits, center=previous)
        assert torch.allclose(proj.reconstruct(proj.start), previous, rtol=0, atol=2e-6)


@pytest.mark.parametrize("bits", [2, 8, 32])
def test_degenerate_candidates_stay_finite_and_start_exactly(bits):
    base = _cands(3, seed=5)
    zero_block = base.clone()
    zero_block[:, :12] = 0.0
    cases = {
        "duplicates": torch.stack([base[0], base[0], base[1], base[1]]),
        "all identical": base[0].repeat(3, 1),
        "scaled copy": torch.stack([base[0], 2 * base[0], base[1]]),
        "dependent": torch.stack([base[0], base[1], base[2], 2 * base[0] - base[1]]),
        "zero block": zero_block,
    }
    for name, w in cases.items():
        for start in ("mean", "last"):
            proj = build_projection(w.clone(), SIZES, "checkpoints", bits, start=start)
            expected = w.double().mean(0).float() if start == "mean" else w[-1]
            assert torch.isfinite(proj.dequantized()).all() and torch.isfinite(proj.start).all(), name
            assert torch.allclose(proj.reconstruct(proj.start), expected, rtol=0, atol=2e-6), name
            assert torch.isfinite(proj.coef_grad(torch.randn(sum(SIZES)))).all(), name
    u = build_projection(cases["duplicates"].clone(), SIZES, "checkpoints", 32).dequantized()
    for a, b in zip([0, 12, 42], [12, 42, 47]):
        assert [bool(r > 0.5) for r in u[:, a:b].norm(dim=1)] == [True, False, True, False]  # duplicates dropped


def test_start_errors_name_start():
    with pytest.raises(ValueError, match="start 4 is out of range: there are 4 candidates"):
        build_projection(_cands(), SIZES, "checkpoints", 32, start=4)
    with pytest.raises(ValueError, match="start 'first'"):
        build_projection(_cands(), SIZES, "checkpoints", 32, start="first")
    with pytest.raises(ValueError, match="start 'last'.*need basis 'checkpoints'"):
        build_projection(_cands(), SIZES, "normalized", 32, start="last")


class _ThreadCollectives:
    """Ranks as threads of one process: every collective swaps tensors through shared slots."""

    def __init__(self, shared: dict, rank: int, ranges) -> None:
        self.shared, self.rank, self.world_size, self.ranges = shared, rank, len(ranges), ranges

    def _exchange(self, t: torch.Tensor) -> list[torch.Tensor]:
        self.shared["slots"][self.rank] = t.clone()
        self.shared["barrier"].wait()
        values = list(self.shared["slots"])
        self.shared["barrier"].wait()
        return values

    def reduce_scatter_sum(self, flat):
        start, end = self.ranges[self.rank]
        return sum(self._exchange(flat))[start:end]

    def all_reduce_sum(self, t):
        return t.copy_(sum(self._exchange(t)))

    def all_gather(self, own, out):
        for (start, end), part in zip(self.ranges, self._exchange(own)):
            out[start:end] = part
        return out


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_two_shards_give_the_single_process_result(optimizer):
    """Each rank builds its blocks' Q and start; X0 is summed across ranks and the decay on
    the weights uses each rank's slice of w."""
    x, y = torch.randn(32, 6, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 3
    cands = perturbed_candidates(tiny_mlp(), 5)
    layout = ParamLayout.from_model(tiny_mlp())
    blocks = make_blocks(layout.numels, "tensor")
    settings = dict(optimizer=optimizer, lr=0.05, weight_decay=0.01, momentum=0.9, grad_clip=5.0)

    def train(twa, model, scale):
        for _ in range(5):
            model.zero_grad()
            (scale * nn.functional.cross_entropy(model(x), y)).backward()
            twa.step()

    model = tiny_mlp()
    single = TWA.from_candidates(model, cands, bits=4, basis="checkpoints", start="last", **settings)
    train(single, model, 1.0)

    runs = list(shard_blocks(blocks.sizes, 4, 2))
    ranges = [(sum(blocks.sizes[:l0]), sum(blocks.sizes[:l1])) for l0, l1 in runs]
    shared = {"slots": [None, None], "barrier": threading.Barrier(2)}
    results, errors = [None, None], []

    def rank(r):
        try:
            (l0, l1), (a, b) = runs[r], ranges[r]
            proj = build_projection(cands[:, a:b].clone(), blocks.sizes[l0:l1], "checkpoints", 4, start="last")
            net = tiny_mlp()
            twa = TWA(net, proj, len(blocks), (l0, l1), collectives=_ThreadCollectives(shared, r, ranges), **settings)
            train(twa, net, 0.5)  # each rank holds the whole batch: half the loss each
            results[r] = (twa.X.detach().clone(), flatten_params(net))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            shared["barrier"].abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for X, w in results:
        assert torch.allclose(X, single.X.detach(), rtol=1e-5, atol=1e-6)
        assert torch.allclose(w, flatten_params(model), rtol=1e-5, atol=1e-6)


def test_checkpoints_hands_collectives_tensors_on_the_data_device():
    model = tiny_mlp()
    layout = ParamLayout.from_model(model)
    blocks = make_blocks(layout.numels, "tensor")
    comm = DeviceCheckingCollectives(layout.num_params, "cpu")
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    cands = perturbed_candidates(model, 3)
    with torch.device("meta"):
        proj = build_projection(cands, blocks.sizes, "checkpoints", 4, start="last")
        twa = TWA(model, proj, len(blocks), collectives=comm, weight_decay=0.01)
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        twa.step()
    assert comm.reduced[0] == (tuple(twa.X.shape), torch.float32)  # X0, summed over ranks
    assert twa.num_steps == 1 and torch.isfinite(twa.X).all()


@pytest.mark.parametrize("bits,start", [(1, "mean"), (4, "last"), (32, 2)])
def test_short_run_improves_on_its_start_at_every_bit_width(bits, start):
    x, y = _problem()
    cands = _sgd_candidates(tiny_mlp(), x, y)
    model = tiny_mlp()
    twa = TWA.from_candidates(model, cands, bits=bits, basis="checkpoints", start=start, lr=0.05,
                              weight_decay=5e-4, schedule=ScheduleSpec("cosine", 60))
    start_loss = _loss(model, x, y)
    for s in range(60):
        i = (s * 32) % len(x)
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32]).backward()
        twa.step()
    assert _loss(model, x, y) < start_loss - 0.05


def test_sgd_decays_the_weights_and_adamw_keeps_its_decoupled_decay():
    cands = perturbed_candidates(tiny_mlp(), 3)
    sgd = TWA.from_candidates(tiny_mlp(), cands, basis="checkpoints", weight_decay=0.01)
    assert sgd.weight_decay_on_weights == 0.01 and sgd.optimizer.param_groups[0]["weight_decay"] == 0.0
    adamw = TWA.from_candidates(tiny_mlp(), cands, basis="checkpoints", optimizer="adamw", weight_decay=0.01)
    assert adamw.weight_decay_on_weights == 0.0 and adamw.optimizer.param_groups[0]["weight_decay"] == 0.01
    journal = TWA.from_candidates(tiny_mlp(), cands, basis="orthonormal-global", weight_decay=0.01)
    assert journal.weight_decay_on_weights == 0.0 and journal.optimizer.param_groups[0]["weight_decay"] == 0.01


def test_resume_restores_x_not_the_start():
    cands = perturbed_candidates(tiny_mlp(), 3)
    model = tiny_mlp()
    twa = TWA.from_candidates(model, cands, basis="checkpoints", start=1, weight_decay=0.01)
    model.zero_grad()
    nn.functional.cross_entropy(model(torch.randn(8, 6)), torch.arange(8) % 3).backward()
    twa.step()
    state = twa.state_dict()
    again = TWA.from_candidates(tiny_mlp(), cands, basis="checkpoints", start=1, weight_decay=0.01)
    again.load_state_dict(state)
    assert torch.equal(again.X, twa.X) and torch.equal(again.weights(), twa.weights())


# ---------------------------------------------------------------- the paper's step schedule


@pytest.mark.parametrize("epochs", [4, 10, 20, 200])
@pytest.mark.parametrize("steps_per_epoch", [1, 3])
def test_default_step_milestones_are_the_papers_epochs(epochs, steps_per_epoch):
    """int(0.5 E) and int(0.75 E + 0.9), as the paper's MultiStepLR stepped once per epoch."""
    expected = {4: [2, 3], 10: [5, 8], 20: [10, 15], 200: [100, 150]}[epochs]
    assert paper_milestones(epochs) == expected == [int(epochs * 0.5), int(epochs * 0.75 + 0.9)]
    spec = ScheduleSpec("step", epochs * steps_per_epoch, epochs=epochs, gamma=0.1)
    # torch's MultiStepLR over epochs: the paper's code
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    multistep = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=expected, gamma=0.1)
    for epoch in range(epochs):
        for k in range(steps_per_epoch):
            step = epoch * steps_per_epoch + k
            assert lr_factor(step, spec) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12), (epoch, k)
        opt.step()
        multistep.step()
    # the same through the LambdaLR the trainers use, step by step
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = make_scheduler(opt, spec)
    lrs = []
    for _ in range(epochs * steps_per_epoch):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    boundaries = [s for s in range(1, len(lrs)) if lrs[s] != lrs[s - 1]]
    assert boundaries == [m * steps_per_epoch for m in expected if m < epochs]


def test_step_schedule_without_epochs_and_with_fractions():
    assert [lr_factor(s, ScheduleSpec("step", 10)) for s in (4, 5, 7, 8)] == pytest.approx([1, 0.1, 0.1, 0.01])
    user = ScheduleSpec("step", 200, milestones=[0.3, 0.9], epochs=20)  # fractions of the budget, as given
    assert [lr_factor(s, user) for s in (59, 60, 179, 180)] == pytest.approx([1, 0.1, 0.1, 0.01])
    with pytest.raises(ValueError, match="schedule epochs must be >= 1"):
        ScheduleSpec("step", 10, epochs=0)
    assert make_optimizer([torch.zeros(1, requires_grad=True)], "sgd", 0.1).param_groups[0]["lr"] == 0.1


# ---------------------------------------------------------------- config keys


def _config_error(overrides):
    with pytest.raises(ConfigError) as info:
        config_from_dict({}, overrides=overrides)
    return str(info.value)


def test_config_basis_and_start_are_validated_naming_the_key():
    assert "twa.basis: 'iclr' is not one of" in _config_error(["twa.basis=iclr"])
    assert "twa.start: start 'first'" in _config_error(["twa.basis=checkpoints", "twa.start=first"])
    assert "twa.start: start -1" in _config_error(["twa.basis=checkpoints", "twa.start=-1"])
    assert "twa.start: expected str or int" in _config_error(["twa.basis=checkpoints", "twa.start=true"])
    assert "twa.start: 'last' needs twa.basis: checkpoints" in _config_error(["twa.start=last"])
    # out of range as soon as the settings bound the number of candidates
    message = _config_error(["twa.basis=checkpoints", "twa.start=5", "twa.candidates=last:9,stride:2"])
    assert "twa.start: 5 is out of range" in message and "at most 5 candidates" in message
    assert "twa.start: 3 is out of range" in _config_error(["twa.basis=checkpoints", "twa.start=3",
                                                            "twa.candidates_per_round=3"])
    cfg = config_from_dict({}, overrides=["twa.basis=checkpoints", "twa.start=2", "twa.bits=4"])
    assert cfg.twa.start == 2 and cfg.twa.bits == 4  # quantisation applies to this basis too
    assert config_from_dict({}).twa.start == "mean"


def test_start_checked_against_the_chosen_candidates():
    cfg = config_from_dict({}, overrides=["twa.basis=checkpoints", "twa.start=4"])
    check_twa_start(cfg.twa, 5)
    with pytest.raises(ConfigError, match=r"twa.start: start 4 is out of range: there are 4 candidates"):
        check_twa_start(cfg.twa, 4)
    rounds = config_from_dict({}, overrides=["twa.basis=checkpoints", "twa.start=3", "twa.candidates_per_round=4"])
    check_twa_start(rounds.twa, 10)
    with pytest.raises(ConfigError, match="there are 3 candidates"):
        check_twa_start(rounds.twa, 3)
    # K indexes the first round's candidates (config validation already rejects this one)
    with pytest.raises(ConfigError, match="there are 4 candidates.*of the first round"):
        check_twa_start(TWAConfig(basis="checkpoints", start=5, candidates_per_round=4), 10)


def test_train_milestones_default_to_the_papers():
    cfg = config_from_dict({"train": {"epochs": 5, "budget_epochs": 10, "schedule": "step"}})
    assert cfg.train.milestones is None
    spec = ScheduleSpec("step", 10 * 7, milestones=cfg.train.milestones, epochs=cfg.train.schedule_epochs)
    assert [lr_factor(s, spec) for s in (34, 35, 55, 56)] == pytest.approx([1, 0.1, 0.1, 0.01])
    assert config_from_dict({"train": {"milestones": [0.3, 0.6]}}).train.milestones == [0.3, 0.6]
