"""Accuracies with intervals: the Wilson score interval against published values."""

from __future__ import annotations

import pytest

from transferkit.runs.records import Score
from transferkit.stats import wilson_interval


@pytest.mark.parametrize(("correct", "n", "low", "high"), [
    (8, 10, 0.4902, 0.9433),  # the textbook example (Newcombe 1998, Wilson without correction)
    (0, 10, 0.0, 0.2775),
    (10, 10, 0.7225, 1.0),
])
def test_wilson_interval_matches_published_values(correct, n, low, high):
    got = wilson_interval(correct, n)
    assert got == (pytest.approx(low, abs=1e-4), pytest.approx(high, abs=1e-4))


def test_no_images_means_no_knowledge():
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_a_score_says_its_split_n_and_interval():
    score = Score.of("val", 34, 38, chose=True)
    assert score.describe() == "val accuracy 0.895 (95 % CI 0.759-0.958, n=38)"
    assert score.low < score.accuracy < score.high
