"""Learning from unlabelled images with a second view (`finetune --unlabeled POOL`):
co-training (Blum & Mitchell 1998) of the linear probe with the images' raw pixels.

Self-training learns only what the probe already believes, so where the probe is often wrong
it adds little (+0.2 points on digits at 5 labels a class, bench/README.md). Co-training has
a second classifier read each image another way: here the 32 px pixels that the data checks
already fit (an RBF SVM). Each round, both are fitted on the labels and the pseudo-labels so
far, both label the pool, and the pool images on which the two agree join the pseudo-labels,
the surest of each class first (the product of the two confidences), the same share per
round as self-training. Where the views err differently, one view's mistakes seldom pass the
other's check. The model saved is the probe alone, fitted on the labels and the
pseudo-labels, so `predict` reads no pixels.

Co-training needs each view good enough on its own. The data checks measured the pixels' and
the probe's out-of-fold accuracy on train: pixels go in only when they reach PIXELS_SUFFICE
of the probe's. At 5 labels a class that held on digits and digits_full in every seed
(0.92-1.16 of the probe's), and failed on the clip-art sets (0.23-0.53), where co-training
with the pixels cost 4-5 points; there the self-trained row is the one that learns from the
pool.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from transferkit.training.adaptation import per_class_sample, pixel_model, pixels
from transferkit.training.candidates.protocol import Fitted
from transferkit.training.candidates.self_trained import (
    ROUNDS,
    SHARE,
    PoolLearning,
    surest_of_each_class,
    usable_pool,
)
from transferkit.training.probe import LinearProbe, fit_probe, sklearn_fits

if TYPE_CHECKING:
    from transferkit.training.loop import Training

CO_TRAINED = "co-trained"  # the candidate's name
PIXELS_SUFFICE = 0.75  # of the probe's out-of-fold accuracy, for the pixels to be a view
# The SVM's one-vs-rest decision values (about +-1 at the margins) become a distribution by a
# softmax at this sharpness: a class 1 unit ahead weighs e^3 (20) to 1.
SHARPNESS = 3.0


# A view: fitted on (images' rows, labels), it gives class probabilities of other rows
View = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def pixel_view(num_classes: int, balanced: bool, seed: int) -> View:
    """The second view: the data checks' pixel model (adaptation.pixel_model), fitted on at
    most MAX_IMAGES images as there (an SVM's cost grows with the square of its images), its
    one-vs-rest decision values turned into probabilities by a softmax at SHARPNESS."""

    def answers(x_fit: np.ndarray, y_fit: np.ndarray, x: np.ndarray) -> np.ndarray:
        rows = per_class_sample(y_fit, seed)
        with sklearn_fits():
            svm = pixel_model(balanced).fit(x_fit[rows], y_fit[rows])
        d = svm.decision_function(x)
        if d.ndim == 1:  # two classes: one value, for the second
            d = np.c_[-d, d]
        e = np.exp(SHARPNESS * (d - d.max(axis=1, keepdims=True)))
        out = np.zeros((len(x), num_classes))
        out[:, svm.classes_] = e / e.sum(axis=1, keepdims=True)
        return out

    return answers


def co_train(probe: LinearProbe, features: tuple[np.ndarray, np.ndarray, np.ndarray],
             second: tuple[np.ndarray, np.ndarray], view: View, y_train: np.ndarray,
             num_classes: int, balanced: bool = False, seed: int = 0) -> PoolLearning:
    """The probe fitted on train's labels and the pool images it and `view` agree on.

    Args:
        probe: a probe fitted on train's `features`.
        features: the features the probe reads, of train, val and the pool.
        second: what `view` reads, of train and the pool (pixel_view: the flat pixels).
        view: the second classifier.
        y_train: train's labels.
    """
    started = time.perf_counter()
    f_train, f_val, f_pool = features
    usable = usable_pool(probe, f_train, f_val, f_pool, seed)
    f_pool, s_train, s_pool = f_pool[usable], second[0], second[1][usable]
    per_round = int(SHARE * len(f_pool) / num_classes)
    chosen, answers = np.zeros(0, int), np.zeros(0, int)
    for round_ in range(1, ROUNDS + 1 if per_round else 1):
        labels = np.r_[y_train, answers[chosen]]
        by_features = fit_probe(np.vstack([f_train, f_pool[chosen]]), labels, num_classes,
                                balanced, seed).probabilities(f_pool)
        by_view = view(np.vstack([s_train, s_pool[chosen]]), labels, s_pool)
        answers = by_features.argmax(axis=1)
        agreed = answers == by_view.argmax(axis=1)
        confidence = np.where(agreed, by_features.max(axis=1) * by_view.max(axis=1), -1.0)
        chosen = surest_of_each_class(confidence, answers, num_classes, per_round * round_)
    final = fit_probe(np.vstack([f_train, f_pool[chosen]]), np.r_[y_train, answers[chosen]],
                      num_classes, balanced, seed)
    return PoolLearning(final, np.flatnonzero(usable)[chosen], answers[chosen],
                        int((~usable).sum()), time.perf_counter() - started)


class CoTrainedCandidate:
    """The candidates table's row: fitted with --unlabeled when the data checks found the
    pixels a view good enough to check the probe's answers. It co-trains the probe on the
    features of the data checks' variant when that beat the probe (on digits, the earlier
    block's), else on the frozen base's, so it improves on the best probe fitted without the
    pool. When it wins, its model is saved as a candidate of its own."""

    kind = CO_TRAINED
    phase = "co-training with the pixels on the unlabelled pool"
    after_checks = True
    own_features = False  # the variant's features, when it co-trains on them

    def fit(self, run: Training, probe: LinearProbe) -> Fitted | None:
        from transferkit.features import FeatureExtractor
        from transferkit.runs.checkpoints import save_best
        from transferkit.training.candidates.variants import (
            VARIANT,
            picked_job,
            probe_on,
            variant_name,
        )
        from transferkit.training.loop import save_probe_model

        found, pool = run.record.adaptation, run.pool
        if pool is None or found is None or \
                found.pixel_accuracy < PIXELS_SUFFICE * found.probe_accuracy:
            return None
        k, balanced, seed = (len(run.splits.class_names), run.class_weights is not None,
                             run.config.data.seed)
        variant_won = any(c.kind == VARIANT and c.won for c in run.record.candidates)
        job = picked_job(run) if variant_won else None
        y_train, y_val = run.splits.train.labels, run.splits.val.labels
        if job is None:
            (x_train, _), (x_val, _) = run.frozen_features()
            x_pool, where = run.pool_features(), "the frozen base's features"
        else:
            extractor = FeatureExtractor.of_model(job, run.reporter, run.config.cache)
            x_train, x_val, x_pool = extractor.features(
                [run.splits.train, run.splits.val, pool.images], "the variant probe's")
            extractor.save()
            where = f"the {variant_name(job)} probe's features"
            probe = fit_probe(x_train, y_train, k, balanced, seed)
        flat = [pixels(images.sources).reshape(len(images), -1)
                for images in (run.splits.train, pool.images)]
        trained = co_train(probe, (x_train, x_val, x_pool), (flat[0], flat[1]),
                           pixel_view(k, balanced, seed), y_train, k, balanced, seed)
        right = trained.probe.probabilities(x_val).argmax(axis=1) == y_val

        def save(run: Training) -> None:
            if job is None:
                save_probe_model(run, trained.probe, CO_TRAINED)
            else:
                save_best(run.run_dir, probe_on(extractor, trained.probe), CO_TRAINED)

        return Fitted(CO_TRAINED, right,
                      f"Probe on {where} co-trained with the pixels, "
                      f"{trained.pseudo_labelled} of {len(pool.images)} pool images labelled "
                      f"where both views agreed, {trained.unlike} left out as unlike every "
                      f"class, C={trained.probe.c:g}", trained.seconds, save,
                      {"pool": str(run.config.unlabeled), "images": len(pool.images),
                       "unreadable": len(pool.unreadable), "features": where,
                       "pseudo_labelled": trained.pseudo_labelled, "unlike": trained.unlike,
                       "pixel_accuracy": found.pixel_accuracy,
                       "probe_accuracy": found.probe_accuracy, "c": trained.probe.c},
                      trained.pseudo(pool.images.sources))
