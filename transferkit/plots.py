"""Figures for people to look at: training curves, the learning-rate range test, the
confusion matrix and a gallery of mistakes. Builds matplotlib figures; artifacts saves them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from transferkit.training.checks import LRFindResult


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1) -> tuple[Figure, Any]:
    from matplotlib.figure import Figure  # no pyplot state, no display needed

    figure = Figure(figsize=(width, height))
    return figure, figure.subplots(nrows, ncols, squeeze=False)


def plot_curves(history: Sequence[dict[str, Any]]) -> Figure:
    """Training vs validation loss and accuracy over all epochs, stage boundaries marked: a
    widening gap between the two is the tell-tale of over-fitting."""
    figure, axes = _figure(11, 4, ncols=2)
    x = np.arange(1, len(history) + 1)
    for ax, metric in zip(axes[0], ("loss", "accuracy"), strict=True):
        for key, style, label in ((metric, "-", "training"), (f"val_{metric}", "--",
                                                                "validation")):
            values = [row.get(key, np.nan) for row in history]
            ax.plot(x, values, style, marker="o", markersize=3, label=label)
        for i in range(1, len(history)):
            if history[i]["stage"] != history[i - 1]["stage"]:
                ax.axvline(i + 0.5, color="grey", linestyle=":")
                ax.text(i + 0.6, ax.get_ylim()[1], history[i]["stage"], va="top", fontsize=8,
                        color="grey")
        ax.set_title(metric)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    return figure


def plot_lr_find(result: LRFindResult) -> Figure:
    figure, axes = _figure(6, 4)
    ax = axes[0][0]
    ax.plot(result.learning_rates, result.losses)
    ax.axvline(result.suggestion, color="red", linestyle="--",
               label=f"suggested {result.suggestion:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss (smoothed)")
    ax.set_title("Learning-rate range test")
    ax.legend()
    ax.grid(alpha=0.3)
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
