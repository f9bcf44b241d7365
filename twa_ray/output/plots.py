"""The run folder's plots (matplotlib, no display needed)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .atomic import write_with  # noqa: E402
from .console import method_rows, summary_metric  # noqa: E402
from .methods import legend_order, method  # noqa: E402


def plot_soups(path: str | Path, model_acc: Sequence[float], marks: dict[str, float], metric: str = "acc") -> None:
    """Test accuracy (the task's ``metric``) of each fine-tuned model (bars) with the soups and
    TWA (``marks``: per method name) as lines, each in its registry entry's colour, line and
    label (``output.methods``)."""
    unit, spec = ("%", ".2f") if metric == "acc" else ("", ".4g")
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    ax.bar(range(len(model_acc)), model_acc, color="tab:gray", alpha=0.6, label="fine-tuned models")
    for name, acc in marks.items():
        entry = method(name)
        ax.axhline(acc, color=entry.style.color, linestyle=entry.style.line, label=f"{entry.label} {acc:{spec}}{unit}")
    low, high = min(list(model_acc) + list(marks.values())), max(list(model_acc) + list(marks.values()))
    if metric == "acc":
        ax.set_ylim(max(0.0, low - 5.0), min(100.0, high + 2.0))
    ax.set_xlabel("fine-tuned model")
    ax.set_ylabel("test accuracy (%)" if metric == "acc" else f"test {metric}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3, fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: str | Path) -> None:
    """Write ``fig`` as a PNG, atomically, to a local path or a URI."""
    write_with(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def plot_sweep(path: str | Path, rows: Sequence[dict], metric: str, params: Sequence[str],
               best_trial: str | None = None, labels: Mapping[str, Mapping] | None = None) -> None:
    """The selection metric (each row's ``metric``) against each swept parameter, one panel
    per key of ``params``; the trial ``best_trial`` (its ``trial_id``) marked with a star.
    Numbers go on a numeric axis (logarithmic when they span a factor of 20 or more), other
    values on a categorical one, labelled ``labels[param][value]`` where given."""
    done = [r for r in rows if r.get(metric) is not None]
    cols = max(1, min(3, len(params)))
    nrows = max(1, -(-len(params) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    for ax, param in zip(axes.flat, params):
        values = [r.get(param) for r in done]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if numeric:
            xs = [float(v) for v in values]
            positive = [x for x in xs if x > 0]
            if positive and len(positive) == len(xs) and max(xs) / min(xs) >= 20:
                ax.set_xscale("log")
            ax.margins(x=0.08)
        else:
            categories = list(dict.fromkeys(str(v) for v in values))
            xs = [categories.index(str(v)) for v in values]
            names = (labels or {}).get(param, {})
            ax.set_xticks(range(len(categories)), [str(names.get(c, c)) for c in categories],
                          rotation=30 if len(categories) > 4 else 0, fontsize=8)
            ax.set_xlim(-0.5, len(categories) - 0.5)
        ys = [r[metric] for r in done]
        ax.scatter(xs, ys, color="tab:blue", alpha=0.7, label="trials")
        for x, y, row in zip(xs, ys, done):
            if best_trial is not None and row.get("trial_id") == best_trial:
                ax.scatter([x], [y], marker="*", s=220, color="tab:red", zorder=3, label=f"best {y:.4g}")
        ax.set_xlabel(param)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(params):]:
        ax.axis("off")
    missing = f" ({len(rows) - len(done)} without a value)" if len(done) < len(rows) else ""
    best = f", best trial {best_trial} marked" if best_trial is not None else ""
    fig.suptitle(f"{metric} of {len(done)} trial(s){missing}{best}", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


# ---------------------------------------------------------------- accuracy.png

MAX_EPOCH_TICKS = 12


@dataclass
class Curve:
    """Accuracy after each epoch of one training run (or of each evaluated candidate)."""

    label: str
    epochs: list[float]
    acc: list[float]  # (%)
    seconds: list[float] | None  # compute seconds at each point; None when the epoch times are unknown
    style: str = "-"
    color: str | None = None  # a method's run: its registry colour (None: the next free one)


@dataclass
class Mark:
    """A method's test accuracy at the cost (epochs, compute seconds) at which it is available."""

    method: str
    label: str
    epoch: float
    acc: float  # (%)
    seconds: float | None


@dataclass
class AccuracyPlot:
    """What accuracy.png shows: ``accuracy_plot`` computes it, ``plot_accuracy`` draws it."""

    curves: list[Curve]
    marks: list[Mark]
    ylim: tuple[float, float]
    epoch_ticks: list[int]

    @property
    def has_seconds(self) -> bool:
        return any(c.seconds is not None for c in self.curves) or any(m.seconds is not None for m in self.marks)


def val_curve(metrics: Sequence[Mapping], key: str = "val_acc") -> tuple[list, list]:
    """(epochs, val values of ``key``: the task's metric) that one training stage recorded at
    the end of each epoch."""
    points = [(float(m["epoch"]), m[key]) for m in metrics if m.get(key) is not None and "epoch" in m]
    return [p[0] for p in points], [p[1] for p in points]


def _stage(metrics: Sequence[Mapping], stage: str) -> list[Mapping]:
    rows = [m for m in metrics if m.get("stage") == stage and _is_number(m.get("epoch"))]
    return sorted(rows, key=lambda m: m["epoch"])


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _clock(rows: Sequence[Mapping], start_epoch: float, start_s: float) -> tuple[list[float], list[float]] | None:
    """(epochs, cumulative compute seconds) of a stage from its rows' epoch ``time``, from
    (``start_epoch``, ``start_s``) on; None when an epoch's time is missing."""
    if not rows or not all(_is_number(r.get("time")) for r in rows):
        return None
    epochs, seconds = [start_epoch], [start_s]
    for r in rows:
        epochs.append(float(r["epoch"]))
        seconds.append(seconds[-1] + float(r["time"]))
    return epochs, seconds


def _at(clock: tuple[list[float], list[float]] | None, epochs: Sequence[float]) -> list[float] | None:
    """The compute seconds at each of ``epochs`` (fractional ones interpolated) on ``clock``."""
    if clock is None:
        return None
    return [float(s) for s in np.interp(epochs, clock[0], clock[1])]


def y_limits(curves: Sequence[Curve], marks: Sequence[Mark], margin: float = 0.1, min_margin: float = 1.0,
             bounds: tuple[float, float] = (0.0, 100.0)) -> tuple[float, float]:
    """The accuracy range that matters: from the lowest marked method or curve point past
    epoch 1 (never the random initial weights, nor the first epoch's far lower values) to
    the highest point, widened by ``margin`` of that span (at least ``min_margin`` points),
    within ``bounds`` (accuracy: [0, 100]). Points below the range fall off the plot."""
    every = [m.acc for m in marks] + [a for c in curves for a in c.acc]
    trained = [m.acc for m in marks] + [a for c in curves for e, a in zip(c.epochs, c.acc) if e > 1]
    if not trained:
        trained = every
    if not trained:
        return bounds
    low, high = min(trained), max(every)
    pad = max(min_margin, margin * (high - low))
    return max(bounds[0], low - pad), min(bounds[1], high + pad)


def epoch_ticks(first: float, last: float, most: int = MAX_EPOCH_TICKS) -> list[int]:
    """Integer ticks from ``first`` to ``last`` epoch, every 1, 2, 5, 10, 20, ... epochs:
    the smallest step that gives at most ``most`` ticks."""
    lo, hi = math.floor(first), math.ceil(last)
    for k in range(12):
        for s in (1, 2, 5):
            step = s * 10 ** k
            start = lo // step * step
            if (hi - start) // step + 1 <= most:
                return list(range(start, hi + 1, step))
    return [lo, hi]


def accuracy_plot(summary: Mapping, metrics: Sequence[Mapping],
                  test_curve: tuple[Sequence[float], Sequence[float]] | None = None) -> AccuracyPlot:
    """accuracy.png's series from a main-job run folder: ``summary`` (summary.json) and
    ``metrics`` (metrics.parquet's rows: ``stage``, ``epoch``, ``val_acc``, ``time``...).

    Curves: the val accuracy by epoch of base training, of the full-budget run and of SGD at
    equal compute (a continuation starts at base training's last point); with ``test_curve``
    (epochs, test accuracies of the evaluated candidates) that too. Marks: the test accuracy
    of each method whose registry entry (``output.methods``) has a marker, at the epochs and
    compute seconds of the results table (``console.method_rows``), in the entries' legend
    order: last, SWA, EMA, best-k at base training's end, TWA and SGD at equal compute after
    TWA's epochs, the full budget at the budget's end. Compute seconds count the training
    loops only (the epochs' ``time``); a curve or mark without them has no point on the
    seconds panel. Whatever the run
    lacks (no full budget, no EMA, no val split) is left out.
    """
    base_rows, full_rows = _stage(metrics, "base_train"), _stage(metrics, "full_budget")
    base_clock = _clock(base_rows, 0.0, 0.0)
    curves, base = [], None
    key = f"val_{summary_metric(summary)}"
    epochs, acc = val_curve(base_rows, key)
    if epochs:
        base = Curve("base training (val)", epochs, acc, _at(base_clock, epochs))
        curves.append(base)
    if test_curve is not None and len(test_curve[0]):
        epochs = [float(e) for e in test_curve[0]]
        curves.append(Curve("candidates (test)", epochs, list(test_curve[1]), _at(base_clock, epochs), "--"))
    for name, continued in (("full_budget", summary.get("full_budget_continued")), ("sgd_same_compute", True)):
        curve = _continuation(name, full_rows if name == "full_budget" else _stage(metrics, name), continued, base,
                              base_clock, key)
        if curve is not None:
            curves.append(curve)
    marks = {r["key"]: Mark(r["key"], r["method"], float(r["epochs"]), r["test"], r["compute_s"])
             for r in method_rows(summary) if method(r["key"]).style.marker and r["epochs"] is not None}
    marks = [marks[name] for name in legend_order(list(marks))]
    xs = [e for c in curves for e in c.epochs] + [m.epoch for m in marks]
    ticks = epoch_ticks(min(xs), max(xs)) if xs else []
    bounds = (0.0, 100.0) if key == "val_acc" else (-math.inf, math.inf)
    return AccuracyPlot(curves, marks, y_limits(curves, marks, bounds=bounds), ticks)


def _continuation(name: str, rows: Sequence[Mapping], continued: bool | None, base: Curve | None,
                  base_clock: tuple[list[float], list[float]] | None, key: str = "val_acc") -> Curve | None:
    """The val curve of the stage ``name`` that trains on from base training (the full budget,
    SGD at equal compute): a continuation (``continued``; None: when its first epoch is past 1)
    starts at base training's last point. None when the stage has no val accuracies."""
    epochs, acc = val_curve(rows, key)
    if not epochs:
        return None
    if continued is None:
        continued = epochs[0] > 1
    start_epoch, start_s = 0.0, 0.0
    if continued:
        start_epoch = epochs[0] - 1
        start_s = base_clock[1][-1] if base_clock is not None and base_clock[0][-1] == start_epoch else None
    seconds = _at(_clock(rows, start_epoch, start_s), epochs) if start_s is not None else None
    if continued and base is not None and base.epochs[-1] == start_epoch:  # join base training's last point
        epochs, acc = [start_epoch] + epochs, [base.acc[-1]] + acc
        seconds = None if seconds is None or base.seconds is None else [base.seconds[-1]] + seconds
    entry = method(name)
    return Curve(f"{entry.label} (val)", epochs, acc, seconds, color=entry.style.color)


def plot_accuracy(path: str | Path, summary: Mapping, metrics: Sequence[Mapping],
                  test_curve: tuple[Sequence[float], Sequence[float]] | None = None) -> AccuracyPlot:
    """Draw accuracy.png (``accuracy_plot``'s series): accuracy against epochs and, where
    the run measured its epochs' times, against compute seconds. Returns the series."""
    data = accuracy_plot(summary, metrics, test_curve)
    metric = summary_metric(summary)
    unit, spec = ("%", ".2f") if metric == "acc" else ("", ".4g")
    panels = [("epoch", "epochs of training (base, then TWA, SGD or the full budget)")]
    if data.has_seconds:
        panels.append(("seconds", "compute seconds (training loops, start-up excluded)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 5.0), squeeze=False, sharey=True)
    colors = iter(("tab:blue", "tab:cyan", "tab:olive", "tab:pink"))
    curve_colors = {c.label: c.color or next(colors) for c in data.curves}
    for ax, (axis, xlabel) in zip(axes[0], panels):
        xs_marked = [m.epoch if axis == "epoch" else m.seconds for m in data.marks]
        xs_all = [x for c in data.curves for x in ((c.epochs if axis == "epoch" else c.seconds) or [])]
        xs_all += [x for x in xs_marked if x is not None]
        # methods available at the same cost (SWA, EMA, best-k...) drawn side by side, a little apart
        nudge = 0.012 * (max(xs_all) - min(xs_all)) if xs_all else 0.0
        for c in data.curves:
            xs = c.epochs if axis == "epoch" else c.seconds
            if xs is not None:
                ax.plot(xs, c.acc, c.style, marker="o", markersize=3.5, color=curve_colors[c.label], alpha=0.8,
                        label=c.label)
        for i, (m, x) in enumerate(zip(data.marks, xs_marked)):
            if x is not None:
                same = [j for j, other in enumerate(xs_marked) if other == x]
                x += nudge * (same.index(i) - (len(same) - 1) / 2)
                marker, color = method(m.method).style.marker, method(m.method).style.color
                ax.plot([x], [m.acc], linestyle="none", marker=marker, markersize=13 if marker == "*" else 8,
                        color=color, markeredgecolor="black", markeredgewidth=0.6, zorder=3,
                        label=f"{m.label} (test) {m.acc:{spec}}{unit}")
        if axis == "epoch" and data.epoch_ticks:
            ax.set_xticks(data.epoch_ticks)
        ax.set_ylim(*data.ylim)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)" if metric == "acc" else metric)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(handles)), fontsize=8)
    fig.tight_layout(rect=(0, 0.02 + 0.045 * math.ceil(len(handles) / 4), 1, 1))
    _save(fig, path)
    return data
