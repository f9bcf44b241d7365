"""accuracy.png: its series (curves and marks, by epoch and by compute second), y range and ticks."""
import matplotlib.pyplot as plt
import pytest

from twa_ray.output.plots import (Curve, Mark, accuracy_plot, epoch_ticks, plot_accuracy, val_curve, y_limits)

# A main job as summary.json and metrics.parquet hold it: 4 base epochs of 1.5 s, a TWA epoch
# of 2 s, and a full budget continued to 8 epochs of 1.25 s each.
SUMMARY = {
    "dataset": "fashion_mnist", "twa_data": "train", "base_epochs": 4, "twa_epochs": 1, "budget_epochs": 8,
    "test_acc": {"last": 82.0, "swa": 82.5, "ema": 83.0, "best_k": 82.75, "full_budget": 85.0, "twa": 84.0},
    "test_loss": {"last": 0.5, "swa": 0.49, "ema": 0.48, "best_k": 0.49, "full_budget": 0.42, "twa": 0.45},
    "time_s": {"base_train": {"startup": 10.0, "compute": 6.0}, "twa": {"startup": 9.0, "compute": 2.0},
               "full_budget": {"startup": 8.0, "compute": 5.0}, "evaluation": {"startup": 3.0, "compute": 9.0}},
    "full_budget_continued": True,
}
BASE = [(1, 40.0), (2, 66.0), (3, 60.0), (4, 78.0)]
FULL = [(5, 84.0), (6, 85.0), (7, 86.0), (8, 86.5)]
METRICS = (
    [{"stage": "base_train", "epoch": e, "val_acc": a, "time": 1.5, "epoch_time_s": None} for e, a in BASE]
    + [{"stage": "twa", "epoch": 1, "round": 0, "val_acc": None, "time": None, "epoch_time_s": 2.0, "select_acc": 90.0}]
    + [{"stage": "full_budget", "epoch": e, "val_acc": a, "time": 1.25, "epoch_time_s": None} for e, a in FULL]
)


def curves_by_label(data):
    return {c.label: c for c in data.curves}


def test_val_curve_comes_from_base_training_metrics():
    assert val_curve([{"epoch": 1, "val_acc": 50.0}, {"epoch": 2}, {"epoch": 3, "val_acc": 70.0}]) == (
        [1.0, 3.0], [50.0, 70.0])


def test_curves_by_epoch_and_compute_seconds():
    data = accuracy_plot(SUMMARY, METRICS)
    curves = curves_by_label(data)
    assert list(curves) == ["base training (val)", "full budget (val)"]
    base, full = curves["base training (val)"], curves["full budget (val)"]
    assert (base.epochs, base.acc) == ([1.0, 2.0, 3.0, 4.0], [40.0, 66.0, 60.0, 78.0])
    assert base.seconds == pytest.approx([1.5, 3.0, 4.5, 6.0])  # cumulative epoch times
    # the full budget continues base training: it starts at base training's last point and clock
    assert (full.epochs, full.acc) == ([4.0, 5.0, 6.0, 7.0, 8.0], [78.0, 84.0, 85.0, 86.0, 86.5])
    assert full.seconds == pytest.approx([6.0, 7.25, 8.5, 9.75, 11.0])


def test_methods_are_marked_where_they_become_available():
    marks = {m.method: m for m in accuracy_plot(SUMMARY, METRICS).marks}
    assert list(marks) == ["last", "swa", "ema", "best_k", "twa", "full_budget"]
    for name in ("last", "swa", "ema", "best_k"):  # at the end of base training
        assert (marks[name].epoch, marks[name].seconds) == (4.0, 6.0)
        assert marks[name].acc == SUMMARY["test_acc"][name]
    assert (marks["twa"].epoch, marks["twa"].seconds, marks["twa"].acc) == (5.0, 8.0, 84.0)  # + 1 TWA epoch of 2 s
    assert (marks["full_budget"].epoch, marks["full_budget"].seconds) == (8.0, 11.0)  # base + its continuation
    assert marks["full_budget"].seconds == curves_by_label(accuracy_plot(SUMMARY, METRICS))["full budget (val)"].seconds[-1]
    assert marks["best_k"].label == "best-k" and marks["twa"].label == "TWA"


def test_y_range_leaves_out_the_first_epoch_and_the_initial_weights():
    # the candidates' test accuracy from the random initial weights (epoch 0) through epoch 1's steps
    test_curve = ([0.0, 0.5, 1.0, 2.0, 3.0, 4.0], [10.0, 50.0, 55.0, 70.0, 65.0, 80.0])
    data = accuracy_plot(SUMMARY, METRICS, test_curve)
    # lowest past epoch 1 or marked: 60 (base val at epoch 3); highest: 86.5; margin 10% of the span
    low, high = 60.0, 86.5
    assert data.ylim == pytest.approx((low - 0.1 * (high - low), high + 0.1 * (high - low)))
    assert data.ylim[0] > 40.0  # epoch 1's val accuracy and the initial weights' 10% are below the range
    assert all(m.acc >= data.ylim[0] for m in data.marks)
    test = curves_by_label(data)["candidates (test)"]
    # fractional epochs (step candidates) lie on base training's clock
    assert test.seconds == pytest.approx([0.0, 0.75, 1.5, 3.0, 4.5, 6.0])


def test_y_limits_rule():
    def curve(points):
        return Curve("c", [float(e) for e, _ in points], [a for _, a in points], None)

    # a margin of at least 1 point, within [0, 100]
    assert y_limits([curve([(2, 99.5), (3, 99.9)])], []) == pytest.approx((98.5, 100.0))
    # only the first epoch: it is all there is to show
    assert y_limits([curve([(0, 10.0), (1, 50.0)])], []) == pytest.approx((6.0, 54.0))
    marks = [Mark("twa", "TWA", 3.0, 70.0, None)]
    assert y_limits([curve([(1, 20.0), (2, 75.0)])], marks) == pytest.approx((69.0, 76.0))
    assert y_limits([], []) == (0.0, 100.0)


def test_epoch_ticks_are_integers():
    assert epoch_ticks(1.0, 8.0) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert epoch_ticks(0.0, 9.0) == list(range(10))
    assert epoch_ticks(0.25, 4.5) == [0, 1, 2, 3, 4, 5]
    for first, last in ((1, 30), (0, 200), (3, 1234), (5, 5)):
        ticks = epoch_ticks(first, last)
        assert all(isinstance(t, int) for t in ticks) and 1 <= len(ticks) <= 12
        step = ticks[1] - ticks[0] if len(ticks) > 1 else 1
        assert ticks[0] <= first and ticks[-1] + step > last and step in (1, 2, 5, 10, 20, 50, 100, 200, 500)
    data = accuracy_plot(SUMMARY, METRICS)
    assert data.epoch_ticks == [1, 2, 3, 4, 5, 6, 7, 8]


def test_without_full_budget_ema_or_epoch_times():
    summary = {**SUMMARY, "test_acc": {**SUMMARY["test_acc"], "ema": None, "full_budget": None},
               "time_s": {**SUMMARY["time_s"], "full_budget": None}, "full_budget_continued": None}
    metrics = [{**m, "time": None} for m in METRICS if m["stage"] != "full_budget"]
    data = accuracy_plot(summary, metrics)
    assert list(curves_by_label(data)) == ["base training (val)"]
    assert curves_by_label(data)["base training (val)"].seconds is None  # no epoch times
    assert [m.method for m in data.marks] == ["last", "swa", "best_k", "twa"]
    assert data.has_seconds  # the marks still have summary.json's compute seconds
    no_times = accuracy_plot({k: v for k, v in summary.items() if k != "time_s"}, metrics)
    assert not no_times.has_seconds and all(m.seconds is None for m in no_times.marks)
    assert no_times.epoch_ticks == [1, 2, 3, 4, 5]


def test_full_budget_trained_from_the_start_has_its_own_clock():
    full = [{"stage": "full_budget", "epoch": e, "val_acc": 50.0 + 4 * e, "time": 1.0} for e in range(1, 9)]
    summary = {**SUMMARY, "full_budget_continued": False}
    data = accuracy_plot(summary, [m for m in METRICS if m["stage"] != "full_budget"] + full)
    curve = curves_by_label(data)["full budget (val)"]
    assert curve.epochs == [float(e) for e in range(1, 9)] and curve.seconds == pytest.approx(range(1, 9))
    mark = next(m for m in data.marks if m.method == "full_budget")
    assert (mark.epoch, mark.seconds) == (8.0, 5.0)  # its own compute only (summary.json's 5 s)


def test_sgd_at_equal_compute_continues_base_training_and_is_marked_after_twas_epochs():
    same = [{"stage": "sgd_same_compute", "epoch": 5, "val_acc": 83.0, "time": 1.5, "epoch_time_s": None}]
    summary = {**SUMMARY, "epochs": {"base": 4, "twa": 1, "full_budget": 8, "sgd_same_compute": 5},
               "test_acc": {**SUMMARY["test_acc"], "sgd_same_compute": 83.5},
               "time_s": {**SUMMARY["time_s"], "sgd_same_compute": {"startup": 7.0, "compute": 1.5}}}
    data = accuracy_plot(summary, METRICS + same)
    curves = curves_by_label(data)
    assert list(curves) == ["base training (val)", "full budget (val)", "SGD, same compute (val)"]
    curve = curves["SGD, same compute (val)"]
    assert (curve.epochs, curve.acc) == ([4.0, 5.0], [78.0, 83.0])  # from base training's last point
    assert curve.seconds == pytest.approx([6.0, 7.5])
    assert curve.color == "tab:pink"
    marks = {m.method: m for m in data.marks}
    assert list(marks) == ["last", "swa", "ema", "best_k", "twa", "sgd_same_compute", "full_budget"]
    # base training's 4 epochs + TWA's 1; base training's 6 s + its own 1.5 s
    assert (marks["sgd_same_compute"].epoch, marks["sgd_same_compute"].seconds) == (5.0, 7.5)


def test_no_val_split_and_no_results():
    data = accuracy_plot({}, [{"stage": "base_train", "epoch": 1, "time": 1.0}])
    assert data.curves == [] and data.marks == [] and data.ylim == (0.0, 100.0) and data.epoch_ticks == []


def test_plot_accuracy_draws_a_panel_per_axis(tmp_path):
    both = plot_accuracy(tmp_path / "plots" / "accuracy.png", SUMMARY, METRICS)
    assert both == accuracy_plot(SUMMARY, METRICS)
    wide = plt.imread(tmp_path / "plots" / "accuracy.png")
    metrics = [{**m, "time": None} for m in METRICS]
    summary = {k: v for k, v in SUMMARY.items() if k != "time_s"}
    plot_accuracy(tmp_path / "epochs_only.png", summary, metrics)
    narrow = plt.imread(tmp_path / "epochs_only.png")
    assert wide.shape[1] == 2 * narrow.shape[1]  # epochs and compute seconds vs. epochs alone
    plot_accuracy(tmp_path / "empty.png", {}, [])
    assert (tmp_path / "empty.png").read_bytes()[:4] == b"\x89PNG"
