"""Calibrated probabilities: temperature scaling (Guo et al. 2017) fitted on validation
predictions, and the expected calibration error that says whether it helped. The temperature
is folded into the softmax layer's weights (softmax(z / T) = softmax(x W/T + b/T)), so the
saved model stays plain Keras and every consumer of it, `predict --threshold` included, gets
calibrated probabilities."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import keras

ECE_BINS = 15
# A temperature outside this range would be fitted to noise: a val split that the model gets
# all right pushes T towards 0 (ever more confident) without bound.
TEMPERATURE_RANGE = (0.5, 10.0)


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray,
                               bins: int = ECE_BINS) -> float:
    """The gap between confidence and accuracy, averaged over equal-width confidence bins
    weighted by how many predictions fall in each."""
    if len(labels) == 0:
        return 0.0
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    error = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            error += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(error)


def _log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    return np.log(np.clip(probabilities.astype(np.float64), 1e-12, 1.0))


def scale(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities with their logits divided by `temperature`."""
    logits = _log_probabilities(probabilities) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    exp = np.exp(logits)
    return exp / exp.sum(axis=1, keepdims=True)


def log_loss(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The mean negative log-likelihood of `labels`."""
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked.astype(np.float64), 1e-12, None)).mean())


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> float | None:
    """The temperature in TEMPERATURE_RANGE that minimises the negative log-likelihood of
    `labels` (the model's softmax outputs give the logits up to a constant per row); 1.0
    when none does better; None when the best sits at an end of the range, where the fit
    only says "further": a val split the model gets all right always asks to sharpen, and
    says nothing about how much."""
    from scipy.optimize import minimize_scalar

    def nll(log_t: float) -> float:
        return log_loss(scale(probabilities, math.exp(log_t)), labels)

    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    found = minimize_scalar(nll, bounds=(low, high), method="bounded")
    if nll(found.x) >= nll(0.0):
        return 1.0
    at_bound = min(abs(found.x - low), abs(found.x - high)) < 1e-3
    return None if at_bound else math.exp(float(found.x))


def fold_temperature(layer: keras.layers.Dense, temperature: float) -> None:
    """Divides a softmax Dense layer's kernel and bias by `temperature`."""
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel / temperature, bias / temperature])
