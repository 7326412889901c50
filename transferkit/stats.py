"""How sure a measured accuracy is. The Wilson score interval is written out here (five
lines) rather than taken from statsmodels, which transferkit would otherwise not need; it
keeps sensible bounds at 0 and 100 % and on the few dozen images a validation split holds.
The paired margin says whether one model beats another on the same images by more than
noise."""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054  # the normal quantile of a two-sided 95 % interval


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The 95 % Wilson score interval of an accuracy of `correct` out of `n` (0..1 for n=0)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_margin(simpler: np.ndarray, other: np.ndarray) -> tuple[int, float]:
    """How many more images `other` gets right than `simpler` on the same images (boolean
    arrays of correct answers), and the noise of that count: the standard deviation of the
    difference under the hypothesis that the two are equally good (McNemar), the square root of
    the number of images on which they disagree."""
    gained = int(np.sum(other & ~simpler))
    lost = int(np.sum(simpler & ~other))
    return gained - lost, math.sqrt(gained + lost)
