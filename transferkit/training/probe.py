"""The linear probe: a multinomial logistic regression on frozen-base features, fitted by
scikit-learn with its regularisation chosen by stratified cross-validation on the training
split alone. It is the bar a fine-tuned model has to beat, a candidate model in its own right,
and (as the softmax layer's starting weights) the start of fine-tuning: LP-FT, Kumar et al.
2022, where a converged head keeps large random-head gradients away from pretrained features.

Measured on Lite0 features (bench/README.md): raw features beat standardised ones, and a
log-loss criterion picks a steadier C than accuracy on a few hundred images.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

# Inverse regularisation strengths tried; C is chosen per data set by cross-validation.
PROBE_CS = tuple(float(c) for c in np.logspace(-2, 2, 9))
MAX_FOLDS = 5
FALLBACK_C = 1.0  # when a class has a single training image, so no fold can hold it out


@dataclass(frozen=True)
class LinearProbe:
    """A fitted probe as the weights of a softmax Dense layer: kernel (d, k), bias (k,)."""

    kernel: np.ndarray
    bias: np.ndarray
    c: float
    folds: int  # 0: C was not cross-validated (a class had one training image)
    seconds: float

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        logits = features.astype(np.float64) @ self.kernel + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


@contextlib.contextmanager
def sklearn_fits() -> Iterator[None]:
    """A context for scikit-learn fits: one BLAS thread, and no notices of future default
    changes. On problems of this size OpenBLAS's threads cost more than they give, and
    change the result's last digits: fit_probe on 1,079 x 1,280 features took 21 s with two
    threads and 3.5 s with one on 2 cores (bench/README.md)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def probe_estimator(c: float, balanced: bool = False) -> Any:
    """The probe's scikit-learn model at a given C, for fits where C is already known."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=c, max_iter=3000, tol=1e-3,
                              class_weight="balanced" if balanced else None)


def fit_probe(features: np.ndarray, labels: np.ndarray, num_classes: int,
              balanced: bool = False, seed: int = 0) -> LinearProbe:
    """Fits the probe on training features. Every class must have a training image.

    `balanced` weighs classes inversely to their frequency, as the run's class weights do.
    """
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    start = time.perf_counter()
    counts = np.bincount(labels, minlength=num_classes)
    weight = "balanced" if balanced else None
    folds = int(min(MAX_FOLDS, counts.min()))
    with sklearn_fits():
        if folds >= 2:
            model = LogisticRegressionCV(
                Cs=list(PROBE_CS), cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
                scoring="neg_log_loss", max_iter=3000, tol=1e-3, class_weight=weight)
            model.fit(features, labels)
            c = float(np.atleast_1d(model.C_)[0])
        else:
            folds, c = 0, FALLBACK_C
            model = probe_estimator(c, balanced)
            model.fit(features, labels)
    kernel = np.zeros((features.shape[1], num_classes), np.float32)
    bias = np.zeros(num_classes, np.float32)
    coef, intercept = model.coef_, model.intercept_
    if coef.shape[0] == 1:  # two classes: one logit, for the second class
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.r_[0.0, intercept]
    kernel[:, model.classes_] = coef.T
    bias[model.classes_] = intercept
    return LinearProbe(kernel, bias, c, folds, time.perf_counter() - start)


def out_of_fold_probabilities(features: np.ndarray, labels: np.ndarray, num_classes: int,
                              seed: int) -> np.ndarray:
    """Each image's class probabilities from a linear probe that never saw it: stratified
    K-fold (K up to 5, as the smallest class allows), C chosen by the probe's own
    cross-validation on all images. A class of one image gets no column from the folds that
    hold it out; its probability there is 0, which is the honest answer."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    counts = np.bincount(labels, minlength=num_classes)
    folds = int(max(2, min(MAX_FOLDS, counts[counts > 0].min())))
    c = fit_probe(features, labels, num_classes, seed=seed).c
    with sklearn_fits():  # and no notices of few members in a class
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        found = cross_val_predict(
            probe_estimator(c), features, labels,
            cv=StratifiedKFold(folds, shuffle=True, random_state=seed), method="predict_proba")
    probabilities = np.zeros((len(labels), num_classes))
    present = np.flatnonzero(counts)
    probabilities[:, present] = found
    return probabilities
