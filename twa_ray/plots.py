"""The run folder's plots (matplotlib, no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .run_folder import atomic_path  # noqa: E402


def plot_accuracy(
    path: str | Path, epochs: Sequence[float], accuracies: Sequence[float], marks: dict[str, float | None],
) -> None:
    """Test accuracy of each base-training candidate by epoch, with SWA/TWA (and others) as lines."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(epochs, accuracies, "o-", label="candidates (base training)")
    styles = {"swa": ("tab:orange", "--"), "twa": ("tab:green", "-")}
    for name, acc in marks.items():
        if acc is None:
            continue
        color, style = styles.get(name, ("tab:red", ":"))
        label = name.upper() if name in styles else name
        ax.axhline(acc, color=color, linestyle=style, label=f"{label} {acc:.2f}%")
    ax.set_xlabel("base-training epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    _save(fig, path)


def plot_coefficients(path: str | Path, coefficients: torch.Tensor, candidate_labels: Sequence[str], block_labels: Sequence[str]) -> None:
    """Heatmap of the learned coefficients X (candidates x blocks)."""
    n, num_blocks = coefficients.shape
    fig, ax = plt.subplots(figsize=(min(16, 2 + 0.25 * num_blocks), min(12, 1.5 + 0.35 * n)))
    limit = float(coefficients.abs().max()) or 1.0
    image = ax.imshow(coefficients.numpy(), aspect="auto", cmap="coolwarm", vmin=-limit, vmax=limit)
    ax.set_yticks(range(n), candidate_labels)
    step = max(1, num_blocks // 40)
    ax.set_xticks(range(0, num_blocks, step), [block_labels[i] for i in range(0, num_blocks, step)], rotation=90, fontsize=6)
    ax.set_xlabel("block")
    ax.set_ylabel("candidate")
    fig.colorbar(image, ax=ax, label="coefficient")
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_sweep(path: str | Path, rows: Sequence[dict], metric: str, x_key: str = "subspace_size", line_key: str = "twa.lr") -> None:
    """Final selection metric against subspace size, one line per learning rate."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    lines: dict = {}
    for row in rows:
        if row.get(metric) is None:
            continue
        lines.setdefault(row.get(line_key), []).append((row[x_key], row[metric]))
    for key, points in sorted(lines.items(), key=lambda kv: (kv[0] is None, kv[0])):
        points.sort()
        label = f"{line_key}={key:.3g}" if isinstance(key, float) else f"{line_key}={key}"
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=label)
    ax.set_xlabel("subspace size (candidates)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
