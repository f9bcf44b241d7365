"""Baseline math (core.baselines): which candidates SWA and best-k average, their streamed
mean against a float64 reference, and the EMA of the weights against a float64
re-derivation of timm ModelEmaV3's update."""
import pytest
import torch

from twa_ray.core.baselines import after_start, best_k, ema_decay, ema_update_, streaming_mean, swa_vector

INFOS = [
    (0, {"kind": "initial", "epoch": 0, "metrics": {}}),
    (1, {"kind": "epoch", "epoch": 1, "metrics": {"val_acc": 70.0}}),
    (2, {"kind": "step", "epoch": 1.5, "metrics": {"train_loss": 0.4}}),  # inside an epoch: no val_acc
    (3, {"kind": "epoch", "epoch": 2, "metrics": {"val_acc": 81.0}}),
    (4, {"kind": "epoch", "epoch": 3, "metrics": {"val_acc": 79.0}}),
    (5, {"kind": "epoch", "epoch": 4, "metrics": {"val_acc": 81.0}}),
]


def test_swa_never_averages_the_initial_weights():
    assert after_start(INFOS) == [1, 2, 3, 4, 5]
    assert after_start(INFOS[1:3]) == [1, 2]


def test_best_k_takes_the_best_val_accuracies_ties_to_the_later():
    assert best_k(INFOS, 1) == [5]  # 3 and 5 tie at 81: the later one
    assert best_k(INFOS, 3) == [3, 4, 5]
    assert best_k(INFOS, 10) == [1, 3, 4, 5]  # step candidates and the initial weights never count
    # even with the best score, the initial weights stay out
    assert best_k([(0, {"kind": "initial", "metrics": {"val_acc": 99.0}})] + INFOS[1:2], 1) == [1]
    with pytest.raises(ValueError, match="k >= 1"):
        best_k(INFOS, 0)


def reference_decay(num_updates: int, decay: float, warmup: bool) -> float:
    """timm ModelEmaV3.get_decay(step=num_updates), num_updates counting this update (train.py)."""
    step = max(0, num_updates - 1)
    if step <= 0:
        return 0.0
    return min(decay, 1 - (1 + step) ** (-2 / 3)) if warmup else decay


def test_decay_schedule_is_timm_model_ema_v3():
    for updates in range(0, 3000, 7):
        for warmup in (True, False):
            assert ema_decay(updates, 0.9998, warmup) == pytest.approx(reference_decay(updates + 1, 0.9998, warmup),
                                                                    abs=1e-15)
    assert ema_decay(0, 0.9998) == 0.0  # the first update copies the weights
    assert ema_decay(1, 0.9998) == pytest.approx(1 - 2 ** (-2 / 3))
    assert ema_decay(10**9, 0.9998) == 0.9998  # warm-up over: the configured decay
    assert ema_decay(5, 0.5, warmup=False) == 0.5


def test_ema_update_matches_a_float64_reference_over_many_steps():
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (4,), (2, 2, 2)]
    weights = [torch.randn(s, generator=gen) for s in shapes]
    ema = [torch.zeros(s) for s in shapes]  # any start: the first update copies
    ref = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    for t in range(200):
        weights = [w + 0.05 * torch.randn(w.shape, generator=gen) for w in weights]  # a random walk, as SGD
        d = ema_decay(t, 0.99)
        ema_update_(ema, weights, d)
        ref = [d * r + (1 - d) * w.double() for r, w in zip(ref, weights)]
        if t == 0:
            assert all(torch.equal(e, w) for e, w in zip(ema, weights))
    for e, r in zip(ema, ref):
        torch.testing.assert_close(e.double(), r, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(ema[0], weights[0], atol=1e-3)  # it is an average, not the last weights


def test_ema_update_checks_its_arguments():
    with pytest.raises(ValueError, match="2 EMA tensors for 1 weights"):
        ema_update_([torch.zeros(1), torch.zeros(1)], [torch.ones(1)], 0.5)


def test_streaming_mean_is_the_float64_mean_rounded_once():
    gen = torch.Generator().manual_seed(0)
    # a large common offset: a float32 running sum or mean would lose the small differences
    rows = 1000.0 + torch.randn(9, 4000, generator=gen)
    reference = rows.double().mean(0)
    seen = []

    def one_at_a_time():
        for row in rows:
            seen.append(row.shape)
            yield row.clone()

    out = streaming_mean(one_at_a_time())
    assert seen == [torch.Size([4000])] * 9 and out.dtype == torch.float32 and out.shape == (4000,)
    torch.testing.assert_close(out.double(), reference, rtol=2.0 ** -24, atol=0)  # float32 rounding only
    assert torch.equal(swa_vector(rows), out)  # the stacked form is the same sum
    assert torch.equal(streaming_mean([rows[0].view(40, 100)]), rows[0])  # any shape, flattened


def test_streaming_mean_checks_its_input():
    with pytest.raises(ValueError, match="no vectors"):
        streaming_mean([])
    with pytest.raises(ValueError, match="vector 1 has 3 values, the first 4"):
        streaming_mean([torch.zeros(4), torch.zeros(3)])
