"""`transferkit augment-preview`: a grid of training images and augmented draws of them, to
judge the augmentation before training with it."""

from __future__ import annotations

import numpy as np

from transferkit.augment import build_augmentation
from transferkit.bases import get_base, resolve_image_size
from transferkit.config import PreviewConfig
from transferkit.data.folders import load_splits
from transferkit.data.pipeline import build_dataset
from transferkit.files import save_figure
from transferkit.reporting import NullReporter, Reporter
from transferkit.reports.plots import plot_augmentation
from transferkit.runs.directory import check_output


def preview_augmentation(config: PreviewConfig, reporter: Reporter | None = None) -> int:
    """`augment-preview`: a grid with one training image per row (taking the classes in turn),
    its original first and then augmented draws, at the size the base sees them, written as a
    PNG. Returns the number of rows.

    Args:
        config: the data folder, augmentation and PNG file to write.
        reporter: where progress goes (none when None).
    """
    reporter = reporter or NullReporter()
    check_output(config.output, config.overwrite, data=config.data.data_dir)
    size = resolve_image_size(get_base(config.base), config.data.image_size)
    train = load_splits(config.data.data_dir, config.data.val_split, config.data.seed,
                        reporter).train
    rng = np.random.default_rng(config.data.seed)
    by_class = [rng.permutation(np.flatnonzero(train.labels == c))
                for c in range(len(train.class_names))]
    order = [int(c[rank]) for rank in range(max(map(len, by_class))) for c in by_class
             if rank < len(c)]
    chosen = order[:config.images]
    batch = np.asarray(next(iter(build_dataset([train.sources[i] for i in chosen], None, size,
                                               batch_size=len(chosen)))))
    augmentation = build_augmentation(config.augment, config.data.seed)
    draws = [np.asarray(augmentation(batch)) if augmentation is not None else batch
             for _ in range(config.variants)]
    labels = [train.class_names[train.labels[i]] for i in chosen]
    save_figure(config.output, plot_augmentation(batch, draws, labels))
    return len(chosen)
