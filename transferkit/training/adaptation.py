"""What the data says about fine-tuning it, decided on the training split alone before any
stage, from two cheap references cross-validated on the same folds (seconds for a few
hundred images):

- **How deep to fine-tune.** Raw pixels (an RBF SVM on 32 px RGB thumbnails, the 1990s
  baseline) against the linear probe on the frozen features. Where the features remove less
  than half of the pixels' errors, they fit the data badly, and every block is fine-tuned
  instead of the top two, at a higher rate after a warm-up. On handwritten digits the
  pixels beat the features (0.93 vs 0.89 out of fold), and tuning every block reached
  0.95-0.96 on test where the top two stayed at the probe's 0.90; on the ImageNet-like sets
  the features remove 70-100 % of the pixels' errors, and deeper tuning only cost time
  (bench/README.md).
- **Whether left-right flips keep labels.** The same pixel model reads each held-out image
  and its mirror image. Where the mirrored ones lose most of its skill, and clearly (McNemar's
  z above 2), left and right carry the label (digits, letters, arrows, parts with a
  handedness), and flips are left out of the augmentation. Pixels are the sharper test:
  ImageNet features were trained to shrug off mirroring, so on mirrored digits the probe
  lost 6 points where the pixel model lost 65.

Scikit-learn does the fitting; the rules are the part written here. What they decide is
applied in training/plan.py.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from transferkit.data.inspect import small_image
from transferkit.runs.records import Adaptation
from transferkit.stats import paired_margin
from transferkit.training.probe import MAX_FOLDS, probe_estimator, sklearn_fits

PIXELS_PX = 32  # thumbnail side: enough for a pixel model, milliseconds per image
MAX_IMAGES = 2000  # a stratified sample beyond this keeps the SVM to seconds
DEEP_BELOW = 0.5  # deep when the probe's errors exceed this fraction of the pixels' errors
# Flips change labels when mirrored images lose more than half of the pixel model's skill
# (its accuracy above always naming the largest class), and more than 2 noise units. Out of
# fold on train: digits lost 71 % of it (z 13); photos 4 % (z 2.8), textures and the tuxpaint
# sets nothing; phase-locked synthetic stripes, whose mirror images are still stripes, 45 %.
MIRROR_SKILL_LOST = 0.5
MIRROR_Z = 2.0


def pixels(sources: Sequence[str]) -> np.ndarray:
    """(n, PIXELS_PX, PIXELS_PX, 3) RGB thumbnails in [0, 1]."""
    return np.stack([np.asarray(small_image(s, "RGB", PIXELS_PX), np.float32) / 255
                     for s in sources])


def per_class_sample(labels: np.ndarray, seed: int) -> np.ndarray:
    """Indices of at most about MAX_IMAGES images, each class in proportion."""
    if len(labels) <= MAX_IMAGES:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        # in proportion (never more than the class has: MAX_IMAGES < len(labels) here), and
        # at least enough for every fold to hold one out
        take = max(min(len(members), MAX_FOLDS), round(len(members) * MAX_IMAGES / len(labels)))
        picked.append(rng.choice(members, take, replace=False))
    return np.sort(np.concatenate(picked))


def pixel_model(balanced: bool) -> Any:
    """The pixel model, unfitted: an RBF SVM on standardised flat pixels (co-training reads
    the images with it too)."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    return make_pipeline(StandardScaler(), SVC(class_weight="balanced" if balanced else None))


def assess(sources: Sequence[str], labels: np.ndarray, features: np.ndarray, c: float,
           balanced: bool, seed: int) -> Adaptation | None:
    """Out-of-fold right answers on train of raw pixels, of the probe (at its C) and of raw
    pixels on mirrored images, and the two decisions; None when a class has too few training
    images to hold any out."""
    from sklearn.model_selection import StratifiedKFold

    start = time.perf_counter()
    pick = per_class_sample(labels, seed)
    y, f = labels[pick], features[pick]
    counts = np.bincount(y)
    folds = int(min(MAX_FOLDS, counts[counts > 0].min()))
    if folds < 2:
        return None
    x = pixels([sources[i] for i in pick])
    flat, mirrored = x.reshape(len(x), -1), x[:, :, ::-1].reshape(len(x), -1)
    right = {k: np.zeros(len(y), bool) for k in ("pixels", "probe", "mirrored")}
    with sklearn_fits():
        for train, held in StratifiedKFold(folds, shuffle=True, random_state=seed).split(
                flat, y):
            svm = pixel_model(balanced).fit(flat[train], y[train])
            right["pixels"][held] = svm.predict(flat[held]) == y[held]
            right["mirrored"][held] = svm.predict(mirrored[held]) == y[held]
            probe = probe_estimator(c, balanced).fit(f[train], y[train])
            right["probe"][held] = probe.predict(f[held]) == y[held]
    pixel_errors, probe_errors = 1 - right["pixels"].mean(), 1 - right["probe"].mean()
    lost, noise = paired_margin(right["mirrored"], right["pixels"])
    skill = right["pixels"].sum() - counts.max()  # right answers above naming the top class
    return Adaptation(
        folds=folds, images=len(y), pixel_accuracy=round(float(right["pixels"].mean()), 4),
        probe_accuracy=round(float(right["probe"].mean()), 4),
        mirrored_accuracy=round(float(right["mirrored"].mean()), 4),
        deep=bool(probe_errors > DEEP_BELOW * pixel_errors),
        mirror_changes_labels=bool(lost > MIRROR_Z * noise
                                   and lost > MIRROR_SKILL_LOST * max(skill, 0)),
        seconds=round(time.perf_counter() - start, 3))
