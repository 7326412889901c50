"""Figures explain themselves: whole-number epochs, the stage boundary and the kept epoch
marked; the augmentation grid labelled."""

from __future__ import annotations

import numpy as np

from transferkit.reports.plots import plot_augmentation, plot_curves

HISTORY = [
    {"stage": "head", "epoch": 1, "loss": 1.0, "accuracy": 0.5, "val_loss": 0.9,
     "val_accuracy": 0.6},
    {"stage": "head", "epoch": 2, "loss": 0.8, "accuracy": 0.6, "val_loss": 0.7,
     "val_accuracy": 0.7},
    {"stage": "finetune", "epoch": 3, "loss": 0.6, "accuracy": 0.7, "val_loss": 0.5,
     "val_accuracy": 0.8},
    {"stage": "finetune", "epoch": 4, "loss": 0.5, "accuracy": 0.8, "val_loss": 0.6,
     "val_accuracy": 0.75},
]


def test_curves_tick_whole_epochs_and_mark_the_boundary_and_the_kept_epoch():
    figure = plot_curves(HISTORY, kept=("finetune", 3))
    figure.canvas.draw()
    for ax in figure.axes:
        ticks = [t for t in ax.get_xticks() if 1 <= t <= 4]
        assert ticks and all(float(t).is_integer() for t in ticks)
        assert any(line.get_xdata()[0] == 2.5 for line in ax.get_lines()
                   if len(line.get_xdata()) == 2)  # the boundary between epochs 2 and 3
        assert "finetune →" in [t.get_text() for t in ax.texts]
        labels = ax.get_legend_handles_labels()[1]
        assert "kept: epoch 3 (finetune)" in labels
    loss_axis = figure.axes[0]
    star = next(line for line in loss_axis.get_lines() if line.get_marker() == "*")
    assert (star.get_xdata()[0], star.get_ydata()[0]) == (3, 0.5)


def test_augmentation_grid_shows_the_original_and_names_each_class():
    originals = np.zeros((2, 8, 8, 3), np.float32)
    draws = [originals + 50, originals + 100]
    figure = plot_augmentation(originals, draws, ["cats", "dogs"])
    titles = [ax.get_title() for ax in figure.axes[:3]]
    assert titles == ["original", "draw 1", "draw 2"]
    assert [figure.axes[0].get_ylabel(), figure.axes[3].get_ylabel()] == ["cats", "dogs"]
