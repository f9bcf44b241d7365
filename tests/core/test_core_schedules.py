"""The rest of a schedule compressed into a continuation (SGD at equal compute), against a
float64 reference: remaining step decays at the same fractions of the continuation, cosine
and linear at their final value on its last step."""
import numpy as np
import pytest
import torch

from twa_ray.core.schedules import (ScheduleSpec, compressed_factor, lr_factor, make_compressed_scheduler,
                                    paper_milestones)


def compressed(spec, start, steps):
    return np.array([compressed_factor(j, spec, start, steps) for j in range(steps)])


def step_reference(decay_steps, gamma, total, start, steps):
    """gamma ** (decays done by ``start`` + those ahead whose fraction of the rest,
    (d - start) / (total - start), the continuation's fraction j / steps has reached)."""
    d = np.asarray(decay_steps, dtype=np.float64)
    done = np.sum(d <= start)
    ahead = d[d > start]
    fractions = (ahead - start) / np.float64(total - start)
    j = np.arange(steps, dtype=np.float64) / steps
    return gamma ** (done + np.sum(j[:, None] >= fractions[None, :], axis=1)).astype(np.float64)


def progress_reference(spec, start, steps):
    """The annealing progress from where training stopped to 1 on the continuation's last step."""
    warmup = round(spec.warmup_frac * spec.total_steps)
    first = np.float64(start - warmup) / (spec.total_steps - warmup)
    return np.linspace(first, 1.0, steps, dtype=np.float64)


def test_step_decays_ahead_come_at_the_same_fractions_of_the_continuation():
    spec = ScheduleSpec("step", total_steps=200, milestones=[0.5, 0.75], gamma=0.1)  # decays at steps 100, 150
    factors = compressed(spec, 80, 24)  # stopped at 80: 20 and 70 of the remaining 120 steps, 1/6 and 7/12
    np.testing.assert_allclose(factors, step_reference([100, 150], 0.1, 200, 80, 24), rtol=1e-12)
    assert factors[:4] == pytest.approx([1.0] * 4) and factors[4:14] == pytest.approx([0.1] * 10)
    assert factors[14:] == pytest.approx([0.01] * 10)
    # stopped on the first decay: it stays, the second comes half-way through the continuation
    np.testing.assert_allclose(compressed(spec, 100, 10), [0.1] * 5 + [0.01] * 5, rtol=1e-12)
    # stopped past it: the second comes a third of the way (25 of the remaining 75 steps)
    np.testing.assert_allclose(compressed(spec, 125, 9), [0.1] * 3 + [0.01] * 6, rtol=1e-12)
    assert compressed_factor(0, spec, 125, 9) == pytest.approx(lr_factor(125, spec), rel=1e-15)


@pytest.mark.parametrize("start,steps", [(20, 15), (30, 10), (5, 7), (49, 3)])
def test_step_with_the_papers_epoch_milestones(start, steps):
    epochs, per_epoch = 10, 5
    spec = ScheduleSpec("step", total_steps=epochs * per_epoch, epochs=epochs, gamma=0.1)
    decay_steps = [e * per_epoch for e in paper_milestones(epochs)]  # epochs 5 and 8
    factors = compressed(spec, start, steps)
    np.testing.assert_allclose(factors, step_reference(decay_steps, 0.1, spec.total_steps, start, steps), rtol=1e-12)
    assert factors[0] == pytest.approx(lr_factor(start, spec), rel=1e-15)  # it goes on from where training stopped


def test_cosine_is_annealed_to_its_final_value_on_the_last_step():
    spec = ScheduleSpec("cosine", total_steps=100, warmup_frac=0.1, final_factor=0.05)
    factors = compressed(spec, 60, 8)
    p = progress_reference(spec, 60, 8)
    np.testing.assert_allclose(factors, 0.05 + 0.95 * 0.5 * (1.0 + np.cos(np.pi * p)), rtol=1e-12)
    assert factors[0] == pytest.approx(lr_factor(60, spec), rel=1e-15)
    assert factors[-1] == pytest.approx(0.05, rel=1e-12)
    assert np.all(np.diff(factors) < 0)


def test_linear_is_annealed_to_its_final_value_on_the_last_step():
    spec = ScheduleSpec("linear", total_steps=120, final_factor=0.1)
    factors = compressed(spec, 90, 5)
    np.testing.assert_allclose(factors, 1.0 - 0.9 * progress_reference(spec, 90, 5), rtol=1e-12)
    assert factors[-1] == pytest.approx(0.1, rel=1e-12)
    # one step: it is the last one
    assert compressed_factor(0, spec, 90, 1) == pytest.approx(0.1, rel=1e-12)


def test_constant_stays_and_a_warmup_left_is_compressed_too():
    assert compressed(ScheduleSpec("constant", total_steps=100), 40, 6).tolist() == [1.0] * 6
    spec = ScheduleSpec("constant", total_steps=100, warmup_frac=0.2)  # 20 warmup steps
    # stopped at step 10: continuation step j stands for step 10 + 90 j / 9 of the budget
    position = 10 + 90 * np.arange(10, dtype=np.float64) / 9
    np.testing.assert_allclose(compressed(spec, 10, 10), np.where(position < 20, (position + 1) / 20, 1.0), rtol=1e-12)


def test_swa_schedule_ends_on_its_tail():
    spec = ScheduleSpec("swa", total_steps=100, final_factor=0.05)
    factors = compressed(spec, 50, 9)
    assert factors[0] == 1.0 and factors[-1] == pytest.approx(0.05) and np.all(np.diff(factors) <= 0)


def test_scheduler_follows_the_factors_and_resumes_exactly():
    spec = ScheduleSpec("cosine", total_steps=100, final_factor=0.0)
    factors = compressed(spec, 70, 12)

    def optimizer():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.2)

    opt = optimizer()
    scheduler = make_compressed_scheduler(opt, spec, 70, 12)
    seen = []
    for _ in range(12):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    np.testing.assert_allclose(seen, 0.2 * factors, rtol=1e-12)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * factors[-1])  # a step past the last keeps it
    # resumed half-way from its state_dict
    opt = optimizer()
    scheduler = make_compressed_scheduler(opt, spec, 70, 12)
    for _ in range(5):
        opt.step()
        scheduler.step()
    state = scheduler.state_dict()
    opt = optimizer()
    resumed = make_compressed_scheduler(opt, spec, 70, 12)
    resumed.load_state_dict(state)
    opt.param_groups[0]["lr"] = resumed.get_last_lr()[0]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * factors[5], rel=1e-12)


def test_a_continuation_outside_the_schedule_is_refused():
    spec = ScheduleSpec("cosine", total_steps=10)
    with pytest.raises(ValueError, match="outside the schedule's 0..10 steps"):
        compressed_factor(0, spec, 11, 5)
    with pytest.raises(ValueError, match="at least one step"):
        compressed_factor(0, spec, 5, 0)
    assert compressed_factor(0, spec, 10, 3) == pytest.approx(0.0, abs=1e-15)  # stopped at the end: the final value
