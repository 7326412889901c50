"""The textbook checks: overfitting a tiny subset, and the learning-rate range test."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from transferkit.config import DataConfig, FinetuneConfig, OptimizerConfig
from transferkit.training.checks import fit_tiny_subset, lr_range_test, valley


def _clusters(n: int = 64, dim: int = 4, seed: int = 0, spread: float = 4.0
              ) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    features = rng.normal(size=(n, dim)).astype(np.float32)
    features[:, 0] += np.where(labels == 1, spread, -spread)
    return features, labels


def test_overfit_check_passes_on_separable_data_and_fails_on_shuffled_labels():
    features, labels = _clusters()
    # 40 epochs instead of the check's 100: separable clusters need far fewer
    passed = fit_tiny_subset(features, labels, 2, 0, "auto", OptimizerConfig(), 0.05, epochs=40)
    assert passed.passed and passed.last_loss < passed.first_loss
    shuffled = np.random.default_rng(1).permutation(labels)
    failed = fit_tiny_subset(features, shuffled, 2, 0, "auto", OptimizerConfig(), 0.05,
                             epochs=40)
    assert not failed.passed and failed.train_accuracy < 0.9


def test_lr_range_test_suggests_a_rate_below_the_blow_up(tmp_path: Path):
    features, labels = _clusters(n=256, dim=16)
    config = FinetuneConfig(data=DataConfig(data_dir=tmp_path, batch_size=32), output=None)
    result = lr_range_test(features, labels, 2, config, steps=80)
    assert 1e-6 <= result.suggestion <= 0.1
    assert len(result.learning_rates) == len(result.losses) >= 20
    assert result.rule == "valley"
    lowest = int(np.argmin(result.losses))
    assert result.suggestion < result.learning_rates[lowest]  # safely on the falling slope
    assert result.losses[lowest] < result.losses[0]


def test_valley_goes_half_way_down_the_longest_fall():
    u_curve = np.array([5.0, 5.1, 4.0, 3.0, 2.0, 1.0, 0.5, 0.6, 3.0, 9.0])
    assert valley(u_curve) == 3  # the fall runs from index 0 (5.0) to 6 (0.5)
    bumpy = np.array([3.0, 2.0, 2.5, 1.5, 1.0, 4.0])
    assert valley(bumpy) == 2  # the longest fall, 3.0 > 2.0 > 1.5 > 1.0, spans indices 0-4


def test_a_minimum_at_the_edge_of_the_range_is_flagged_and_not_taken(tmp_path: Path):
    """The issue's case: on easy features the loss still falls at lr 1.0; the old rule took a
    tenth of it (0.1) and stage 1 diverged. The valley rule stays orders of magnitude lower,
    and the result says the minimum sat at the edge."""
    features, labels = _clusters(n=256, dim=16, spread=8.0)
    config = FinetuneConfig(data=DataConfig(data_dir=tmp_path, batch_size=32), output=None)
    result = lr_range_test(features, labels, 2, config, max_lr=0.1, steps=60)
    assert result.at_edge and len(result.losses) == 60  # never blew up
    assert int(np.argmin(result.losses)) >= len(result.losses) - 3
    assert result.suggestion <= 0.1 / 20
