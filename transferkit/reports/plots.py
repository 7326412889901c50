"""Figures for people to look at: training curves, the learning-rate range test, the
confusion matrix, a gallery of mistakes and the augmentation grid. Builds matplotlib figures
(no pyplot state); files.save_figure writes them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from transferkit.runs.records import LRFind


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1) -> tuple[Figure, Any]:
    from matplotlib.figure import Figure  # no pyplot state, no display needed

    figure = Figure(figsize=(width, height))
    return figure, figure.subplots(nrows, ncols, squeeze=False)


def plot_curves(history: Sequence[dict[str, Any]], kept: tuple[str, int | None] | None = None
                ) -> Figure:
    """Training vs validation loss and accuracy per epoch (a widening gap between the two is
    the tell-tale of over-fitting), with the boundary between stages and the kept epoch
    marked. `kept` is (stage, epoch) of the saved model."""
    from matplotlib.ticker import MaxNLocator

    figure, axes = _figure(11, 4, ncols=2)
    x = [row["epoch"] for row in history]
    boundaries = [(history[i]["epoch"] - 0.5, history[i]["stage"]) for i in range(1, len(history))
                  if history[i]["stage"] != history[i - 1]["stage"]]
    for ax, metric in zip(axes[0], ("loss", "accuracy"), strict=True):
        for key, style, label in ((metric, "-", "training"), (f"val_{metric}", "--",
                                                                "validation")):
            values = [row.get(key, np.nan) for row in history]
            ax.plot(x, values, style, marker="o", markersize=3, label=label)
        for at, stage in boundaries:
            ax.axvline(at, color="grey", linestyle=":")
            ax.annotate(f"{stage} →", (at, 1), xycoords=("data", "axes fraction"),
                        xytext=(3, -3), textcoords="offset points", va="top", fontsize=8,
                        color="grey")
        if kept is not None and kept[1] is not None:
            row = next((r for r in history if r["stage"] == kept[0]
                        and r["epoch"] == kept[1]), None)
            if row is not None and f"val_{metric}" in row:
                ax.plot([row["epoch"]], [row[f"val_{metric}"]], marker="*", markersize=14,
                        color="crimson", linestyle="none",
                        label=f"kept: epoch {row['epoch']} ({kept[0]})")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if metric == "accuracy":  # the whole scale: one image of 20 is not a cliff
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(metric)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    if kept is not None and kept[1] is None:
        figure.suptitle(f"kept: the {kept[0]} model, fitted before these epochs", fontsize=10)
    return figure


def plot_lr_find(result: LRFind) -> Figure:
    figure, axes = _figure(6, 4)
    ax = axes[0][0]
    ax.plot(result.learning_rates, result.losses)
    ax.axvline(result.suggestion, color="red", linestyle="--",
               label=f"suggested {result.suggestion:.2g} ({result.rule})")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss (smoothed)")
    ax.set_title("Learning-rate range test"
                 + (": lowest loss at the top of the range" if result.at_edge else ""))
    ax.legend()
    ax.grid(alpha=0.3)
    return figure


def plot_augmentation(originals: np.ndarray, draws: Sequence[np.ndarray],
                      labels: Sequence[str]) -> Figure:
    """One image per row: the original, then augmented draws of it; rows name their class."""
    columns = [originals, *draws]
    figure, axes = _figure(1.6 * len(columns), 1.7 * len(originals), ncols=len(columns),
                           nrows=len(originals))
    for r, label in enumerate(labels):
        for c, batch in enumerate(columns):
            ax = axes[r][c]
            ax.imshow(np.clip(batch[r], 0, 255).astype(np.uint8))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title("original" if c == 0 else f"draw {c}", fontsize=9)
        axes[r][0].set_ylabel(label, fontsize=9)
    figure.suptitle("Augmentation: what training sees", fontsize=10)
    return figure


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str]) -> Figure:
    """Rows are true classes, columns predictions; cells show counts, shaded by row share."""
    size = max(4.0, 0.6 * len(class_names) + 2)
    figure, axes = _figure(size, size)
    ax = axes[0][0]
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center",
                color="white" if shares[i, j] > 0.5 else "black")
    ax.set_title("Confusion matrix")
    return figure


def plot_gallery(images: Sequence[np.ndarray], captions: Sequence[str], title: str) -> Figure:
    """Thumbnails with captions, up to 4 per row."""
    cols = min(4, max(1, len(images)))
    rows = max(1, -(-len(images) // cols))
    figure, axes = _figure(3 * cols, 3.2 * rows, ncols=cols, nrows=rows)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions, strict=False):
        ax.imshow(np.clip(image, 0, 255).astype(np.uint8))
        ax.set_title(caption, fontsize=8)
    figure.suptitle(title)
    return figure
