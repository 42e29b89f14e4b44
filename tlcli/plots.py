"""The pictures a run leaves: training curves and the confusion matrix (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def plot_curves(rows: list[dict], out: Path) -> None:
    """Loss and accuracy per epoch, counted across stages, with each later stage's start marked."""
    if not rows:
        return
    plt = _pyplot()
    x = list(range(1, len(rows) + 1))
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(x, [r["train_loss"] for r in rows], label="train")
    ax_acc.plot(x, [r["train_acc"] for r in rows], label="train")
    if "val_loss" in rows[0]:
        ax_loss.plot(x, [r["val_loss"] for r in rows], label="val")
        ax_acc.plot(x, [r["val_acc"] for r in rows], label="val")
    for i in range(1, len(rows)):
        if rows[i].get("stage") != rows[i - 1].get("stage"):
            for ax in (ax_loss, ax_acc):
                ax.axvline(x[i] - 0.5, color="grey", linestyle="--", linewidth=0.8)
                ax.text(x[i] - 0.4, ax.get_ylim()[1], rows[i]["stage"], va="top", fontsize=8, color="grey")
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_confusion(matrix: np.ndarray, class_names: list[str], out: Path, accuracy: float) -> None:
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    size = max(5, 0.5 * len(class_names) + 3)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(matrix, display_labels=class_names).plot(ax=ax, cmap="Blues", colorbar=False)
    ax.set_title(f"test accuracy {accuracy:.4f}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
