"""The pictures a run leaves: training curves, the confusion matrix and the top losses (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tlcli.text import printable


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
    fig = curves_figure(rows)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def curves_figure(rows: list[dict]):
    plt = _pyplot()
    x = list(range(1, len(rows) + 1))
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(x, [r["train_loss"] for r in rows], label="train")
    ax_acc.plot(x, [r["train_acc"] for r in rows], label="train")
    if "val_loss" in rows[0]:
        ax_loss.plot(x, [r["val_loss"] for r in rows], label="val")
        ax_acc.plot(x, [r["val_acc"] for r in rows], label="val")
    starts = [i for i in range(len(rows)) if i == 0 or rows[i].get("stage") != rows[i - 1].get("stage")]
    for i in starts if len(starts) > 1 else []:
        for ax in (ax_loss, ax_acc):
            if i:
                ax.axvline(x[i] - 0.5, color="grey", linestyle="--", linewidth=0.8)
            # Inside the axes, on a white box, at the top: readable over the curves, never clipped.
            # A stage that starts in the last quarter is labelled left of its line, so the label stays inside.
            right = i and x[i] > x[0] + 0.75 * (x[-1] - x[0])
            label = f"{rows[i]['stage']} →" if right else rows[i]["stage"]
            ax.annotate(label, xy=(x[i] - 0.5 if i else x[0], 0.97), xycoords=("data", "axes fraction"),
                        xytext=(-4 if right else 4, 0), textcoords="offset points", va="top",
                        ha="right" if right else "left", fontsize=10,
                        bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "grey", "alpha": 0.9})
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def plot_confusion(matrix: np.ndarray, class_names: list[str], out: Path, accuracy: float) -> None:
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    size = max(5, 0.5 * len(class_names) + 3)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay(matrix, display_labels=[printable(c) for c in class_names]).plot(ax=ax, cmap="Blues", colorbar=False)
    ax.set_title(f"test accuracy {accuracy:.4f}")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_top_losses(items: list[dict], out: Path, columns: int = 4) -> None:
    """The most confidently wrong images, each titled true / predicted (probability) / loss,
    as fastai's `plot_top_losses`. `items` carry `image`: HWC or HW, uint8 or [0, 1] float."""
    plt = _pyplot()
    if not items:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, "no test image was misclassified", ha="center", va="center", fontsize=12)
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return
    rows = (len(items) + columns - 1) // columns
    # constrained layout makes room for each three-line title and the suptitle; tight_layout overlapped them.
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.6 * rows + 0.4), squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.axis("off")
    for ax, item in zip(axes.flat, items):
        image = item["image"]
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest",
                  vmin=0, vmax=255 if image.dtype == np.uint8 else 1)
        ax.set_title(f"true {printable(item['true'])}\npred {printable(item['predicted'])} ({item['probability']:.2f})\n"
                     f"loss {item['loss']:.2f}", fontsize=10)
    fig.suptitle("top losses: most confidently wrong test images", fontsize=12)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_sweep(rows: list[dict], boundaries: list[str], choice: str, out: Path) -> None:
    """A sweep's accuracy per boundary: the probe and unfreeze-from-here lines on val, the probes
    cross-validated over train+val (dotted), the multi-depth probe as a dashed level, the
    recommendation circled."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(boundaries) + 2) + 3.2, 4.2))
    x_of = {b: i for i, b in enumerate(boundaries)}
    for kind, style, field, label in (("probe", "o-", "val_acc", "linear probe (val)"),
                                      ("probe", "o:", "cv_acc", "linear probe (cross-validated)"),
                                      ("unfreeze", "s-", "val_acc", "unfreeze from here, LP-FT (val)")):
        points = sorted((x_of[r["boundary"]], r[field]) for r in rows
                        if r["kind"] == kind and r["boundary"] in x_of and r.get(field) is not None)
        if kind == "unfreeze":  # above the head's input, unfreezing trains the head alone: the probe's point
            points += [(x_of[r["boundary"]], r["val_acc"]) for r in rows if r["kind"] == "probe" and r["boundary"] == boundaries[-1]]
            points.sort()
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], style, label=label)
    for r in rows:
        if r["kind"] == "multi-depth":
            ax.axhline(r["val_acc"], color="grey", linestyle="--", linewidth=1, label="multi-depth probe (val)")
            if r.get("cv_acc") is not None:
                ax.axhline(r["cv_acc"], color="grey", linestyle=":", linewidth=1, label="multi-depth (cross-validated)")
        if r["id"] == choice:
            x = x_of.get(r["boundary"], len(boundaries) - 1)
            ax.plot([x], [r["val_acc"] if r.get("cv_acc") is None else r["cv_acc"]], "o", markersize=14,
                    markerfacecolor="none", markeredgecolor="red", label="recommended")
    ax.set_xticks(range(len(boundaries)))
    ax.set_xticklabels([printable(b) for b in boundaries], rotation=30, ha="right")
    ax.set_xlabel("freeze boundary (deeper to the right)")
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy vs depth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the lines, never over them
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
