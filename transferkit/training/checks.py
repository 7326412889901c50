"""The textbook's sanity checks, run on frozen-base features so they take seconds:
overfitting a tiny subset (can the pipeline learn at all?) and a learning-rate range test."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from transferkit.artifacts import check_new_output, save_image
from transferkit.augment import augment_grid, build_augmentation
from transferkit.bases import get_base, resolve_image_size
from transferkit.config import AugmentConfig, FinetuneConfig, OptimizerConfig
from transferkit.data import build_dataset, load_splits
from transferkit.features import predict_features
from transferkit.model import build_head
from transferkit.reporting import NullReporter, Reporter
from transferkit.training.stages import compile_model

if TYPE_CHECKING:

    from transferkit.training.finetune import Prepared

OVERFIT_BATCHES = 2
OVERFIT_EPOCHS = 100
OVERFIT_TARGET = 0.99


@dataclass(frozen=True)
class OverfitResult:
    images: int
    epochs: int
    train_accuracy: float
    first_loss: float
    last_loss: float

    @property
    def passed(self) -> bool:
        return self.train_accuracy >= OVERFIT_TARGET


def fit_tiny_subset(features: np.ndarray, labels: np.ndarray, num_classes: int,
                    dense_units: int, init: str, optimizer: OptimizerConfig,
                    learning_rate: float, epochs: int = OVERFIT_EPOCHS) -> OverfitResult:
    """Trains the head on a few examples with no dropout, no L2 and no augmentation, full
    batch; a working pipeline drives training accuracy to ~100 %."""
    head = build_head(features.shape[1], num_classes, dense_units, dropout=0.0, l2=0.0,
                      init=init)
    compile_model(head, optimizer, learning_rate)
    history = head.fit(features, labels, batch_size=len(features), epochs=epochs, verbose=0,
                       shuffle=False).history
    _, accuracy = head.evaluate(features, labels, batch_size=len(features), verbose=0)
    return OverfitResult(len(features), epochs, float(accuracy), float(history["loss"][0]),
                         float(history["loss"][-1]))


def overfit_check(config: FinetuneConfig, reporter: Reporter | None = None) -> OverfitResult:
    """`finetune --overfit-check`: can the head memorise two batches of training images?"""
    from transferkit.training.finetune import prepare

    reporter = reporter or NullReporter()
    prepared = prepare(dataclasses.replace(config, output=None), reporter)
    train = prepared.splits.train
    n = min(len(train), OVERFIT_BATCHES * config.data.batch_size)
    chosen = np.sort(np.random.default_rng(config.data.seed).permutation(len(train))[:n])
    subset = train.subset(np.isin(np.arange(len(train)), chosen))
    features = predict_features(prepared.extractor, subset.sources, prepared.image_size,
                                config.data.batch_size, reporter, "subset")
    return fit_tiny_subset(features, subset.labels, len(train.class_names), config.dense_units,
                           config.init, config.optimizer, config.learning_rate)


@dataclass(frozen=True)
class LRFindResult:
    learning_rates: tuple[float, ...]
    losses: tuple[float, ...]  # smoothed
    suggestion: float

    def to_dict(self) -> dict[str, Any]:
        return {"learning_rates": list(self.learning_rates), "losses": list(self.losses),
                "suggestion": self.suggestion}


def lr_range_test(features: np.ndarray, labels: np.ndarray, num_classes: int,
                  config: FinetuneConfig, min_lr: float = 1e-6, max_lr: float = 1.0,
                  steps: int = 100, seed: int = 0) -> LRFindResult:
    """Trains the head with a learning rate growing exponentially from `min_lr` to `max_lr`,
    one mini-batch per step, until the smoothed loss explodes. Suggests a tenth of the rate
    at the lowest loss: the last rate that is still safely on the descending slope."""
    head = build_head(features.shape[1], num_classes, config.dense_units, config.dropout,
                      config.l2, config.init)
    compile_model(head, config.optimizer, min_lr)
    rng = np.random.default_rng(seed)
    batch = min(config.data.batch_size, len(features))
    rates: list[float] = []
    losses: list[float] = []
    average, lowest = 0.0, math.inf
    for step in range(steps):
        rate = min_lr * (max_lr / min_lr) ** (step / (steps - 1))
        head.optimizer.learning_rate.assign(rate)
        idx = rng.choice(len(features), size=batch, replace=False)
        loss = float(np.atleast_1d(head.train_on_batch(features[idx], labels[idx]))[0])
        average = 0.9 * average + 0.1 * loss
        smoothed = average / (1 - 0.9 ** (step + 1))
        if not math.isfinite(smoothed):
            break
        rates.append(rate)
        losses.append(smoothed)
        lowest = min(lowest, smoothed)
        if step > 10 and smoothed > 4 * lowest:
            break
    suggestion = rates[int(np.argmin(losses))] / 10
    return LRFindResult(tuple(rates), tuple(losses), float(max(suggestion, min_lr)))


def lr_find(config: FinetuneConfig, prepared: Prepared,
            reporter: Reporter | None = None) -> LRFindResult:
    """`finetune --lr-find`: the range test on the training images' frozen features."""
    reporter = reporter or NullReporter()
    train = prepared.splits.train
    features = predict_features(prepared.extractor, train.sources, prepared.image_size,
                                config.data.batch_size, reporter, "training")
    result = lr_range_test(features, train.labels, len(train.class_names), config,
                           seed=config.data.seed)
    reporter.info(f"Learning-rate range test: lowest loss near "
                  f"{result.suggestion * 10:.2g}; using a tenth of it, "
                  f"{result.suggestion:.2g}, for stage 1.")
    return result


def preview_augmentation(data_dir: Path, output: Path, augment: AugmentConfig, base: str,
                         image_size: int | None, images: int, variants: int, seed: int,
                         overwrite: bool = False, reporter: Reporter | None = None) -> None:
    """`augment-preview`: a grid of a few training images and augmented draws of each, at
    the size the base sees them, written as a PNG."""
    reporter = reporter or NullReporter()
    check_new_output(output, overwrite, what="output file")
    size = resolve_image_size(get_base(base), image_size)
    train = load_splits(data_dir, 0.2, seed, reporter).train
    chosen = np.random.default_rng(seed).permutation(len(train))[:max(1, images)]
    batch = np.asarray(next(iter(build_dataset([train.sources[i] for i in chosen], None, size,
                                               batch_size=len(chosen)))))
    save_image(output, augment_grid(batch, build_augmentation(augment, seed), variants),
               overwrite)
