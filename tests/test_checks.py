"""The textbook checks: overfitting a tiny subset, and the learning-rate range test."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from transferkit.config import DataConfig, FinetuneConfig, OptimizerConfig
from transferkit.training.checks import fit_tiny_subset, lr_range_test


def _clusters(n: int = 64, dim: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    features = rng.normal(size=(n, dim)).astype(np.float32)
    features[:, 0] += np.where(labels == 1, 4.0, -4.0)
    return features, labels


def test_overfit_check_passes_on_separable_data_and_fails_on_shuffled_labels():
    features, labels = _clusters()
    passed = fit_tiny_subset(features, labels, 2, 0, "auto", OptimizerConfig(), 0.05)
    assert passed.passed and passed.last_loss < passed.first_loss
    shuffled = np.random.default_rng(1).permutation(labels)
    failed = fit_tiny_subset(features, shuffled, 2, 0, "auto", OptimizerConfig(), 0.05)
    assert not failed.passed and failed.train_accuracy < 0.9


def test_lr_range_test_suggests_a_rate_below_the_blow_up(tmp_path: Path):
    features, labels = _clusters(n=256, dim=16)
    config = FinetuneConfig(data=DataConfig(tmp_path, batch_size=32), output=None)
    result = lr_range_test(features, labels, 2, config, steps=80)
    assert 1e-6 <= result.suggestion <= 0.1
    assert len(result.learning_rates) == len(result.losses) >= 20
    lowest = int(np.argmin(result.losses))
    assert result.suggestion == result.learning_rates[lowest] / 10
    assert result.losses[lowest] < result.losses[0]
