"""The textbook's sanity checks, run on frozen-base features so they take seconds:
overfitting a tiny subset (can the pipeline learn at all?) and a learning-rate range test."""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras
import numpy as np

from transferkit.augment import build_augmentation
from transferkit.bases import get_base
from transferkit.config import (
    AUTO_BASE,
    DEFAULT_BASE,
    FinetuneConfig,
    OptimizerConfig,
)
from transferkit.errors import ConfigError
from transferkit.features import predict_features
from transferkit.model import build_head
from transferkit.reporting import NullReporter, Reporter
from transferkit.runs.records import LRFind
from transferkit.training.prepare import Prepared, prepare
from transferkit.training.stages import compile_model
from transferkit.workers import MULTIWORKER

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
    reporter = reporter or NullReporter()
    if config.compute.strategy == MULTIWORKER:
        raise ConfigError("--overfit-check runs on one machine; drop --strategy multiworker.")
    base = DEFAULT_BASE if config.base == AUTO_BASE else config.base  # the pipeline's check
    prepared = prepare(config, get_base(base), reporter)
    train = prepared.splits.train
    n = min(len(train), OVERFIT_BATCHES * config.data.batch_size)
    chosen = np.sort(np.random.default_rng(config.data.seed).permutation(len(train))[:n])
    subset = train.subset(np.isin(np.arange(len(train)), chosen))
    features = predict_features(prepared.extractor, subset.sources, prepared.image_size,
                                config.data.batch_size, reporter, "subset")
    return fit_tiny_subset(features, subset.labels, len(train.class_names), config.dense_units,
                           config.init, config.optimizer, config.learning_rate)


def valley(losses: np.ndarray) -> int:
    """The index of the suggested rate, by the valley rule fastai's suggestions use: take the
    longest stretch over which the loss keeps falling (the longest decreasing subsequence of
    the smoothed losses) and go half way down it, where it is steep but still far from the
    point where training turns unstable."""
    n = len(losses)
    length = np.ones(n, dtype=int)  # of the longest decreasing chain ending at i
    first = np.arange(n)  # where that chain starts
    for i in range(1, n):
        earlier = np.flatnonzero(losses[:i] > losses[i])
        if len(earlier):
            j = earlier[np.argmax(length[earlier])]
            length[i], first[i] = length[j] + 1, first[j]
    end = int(np.argmax(length))
    return int(first[end]) + (end - int(first[end])) // 2


def lr_range_test(features: np.ndarray, labels: np.ndarray, num_classes: int,
                  config: FinetuneConfig, min_lr: float = 1e-6, max_lr: float = 1.0,
                  steps: int = 100, seed: int = 0) -> LRFind:
    """Trains the head with a learning rate growing exponentially from `min_lr` to `max_lr`,
    one mini-batch per step, until the smoothed loss explodes; suggests a rate by the valley
    rule. `at_edge` says the loss was still at its lowest at the top of the range, where
    the test cannot tell a good rate from one about to diverge."""
    keras.utils.set_random_seed(seed)
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
    curve = np.array(losses)
    at_edge = int(np.argmin(curve)) >= len(curve) - max(2, len(curve) // 20)
    return LRFind(learning_rates=tuple(rates), losses=tuple(losses),
                  suggestion=float(rates[valley(curve)]), rule="valley", at_edge=at_edge)


def lr_find(config: FinetuneConfig, prepared: Prepared,
            reporter: Reporter | None = None) -> LRFind:
    """`finetune --lr-find`: the range test on the frozen-base features of augmented
    training images, as the head stage will see them."""
    reporter = reporter or NullReporter()
    train = prepared.splits.train
    features = predict_features(prepared.extractor, train.sources, prepared.image_size,
                                config.data.batch_size, reporter, "augmented training",
                                augment=build_augmentation(config.augment, config.data.seed))
    result = lr_range_test(features, train.labels, len(train.class_names), config,
                           seed=config.data.seed)
    reporter.info(f"Learning-rate range test: {result.suggestion:.2g} for the head stage (valley "
                  f"rule: half way down the longest fall of the loss).")
    if result.at_edge:
        reporter.warning(
            f"The loss was still at its lowest at the top of the range tried "
            f"(lr {result.learning_rates[-1]:.2g}), so the test cannot tell where training "
            f"turns unstable. Check lr_find.png and the epoch losses; pass --learning-rate "
            f"to choose a rate yourself.")
    return result
