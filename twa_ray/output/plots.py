"""The run folder's plots (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .atomic import atomic_path  # noqa: E402


def plot_accuracy(
    path: str | Path, curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], marks: Mapping[str, float | None],
) -> None:
    """Accuracy curves by base-training epoch ({label: (epochs, accuracies)}, e.g. the
    candidates' val accuracy that base training recorded) with each method's test
    accuracy ({name: accuracy or None}) as a horizontal line."""
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for (label, (epochs, accuracies)), color in zip(curves.items(), ("tab:blue", "tab:cyan", "tab:olive")):
        if len(epochs):
            ax.plot(epochs, accuracies, "o-", color=color, label=label)
    styles = {"last": ("tab:gray", ":"), "swa": ("tab:orange", "--"), "ema": ("tab:purple", "-."),
              "best_k": ("tab:brown", "--"), "full_budget": ("tab:red", ":"), "twa": ("tab:green", "-")}
    names = {"last": "last", "swa": "SWA", "ema": "EMA", "best_k": "best-k", "full_budget": "full budget", "twa": "TWA"}
    for name, acc in marks.items():
        if acc is None:
            continue
        color, style = styles.get(name, ("tab:gray", ":"))
        ax.axhline(acc, color=color, linestyle=style, label=f"{names.get(name, name)} (test) {acc:.2f}%")
    ax.set_xlabel("base-training epoch")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_soups(path: str | Path, model_acc: Sequence[float], marks: dict[str, float]) -> None:
    """Test accuracy of each fine-tuned model (bars) with the soups and TWA as lines."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    ax.bar(range(len(model_acc)), model_acc, color="tab:gray", alpha=0.6, label="fine-tuned models")
    styles = {"best_individual": ("tab:blue", ":"), "uniform_soup": ("tab:orange", "--"),
              "greedy_soup": ("tab:red", "-."), "twa": ("tab:green", "-")}
    for name, acc in marks.items():
        color, style = styles.get(name, ("black", ":"))
        ax.axhline(acc, color=color, linestyle=style, label=f"{name.replace('_', ' ')} {acc:.2f}%")
    low = min(list(model_acc) + list(marks.values()))
    ax.set_ylim(max(0.0, low - 5.0), min(100.0, max(list(model_acc) + list(marks.values())) + 2.0))
    ax.set_xlabel("fine-tuned model")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3, fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
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
