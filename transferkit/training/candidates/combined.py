"""The combined candidate: one linear probe on the frozen features of several offline bases
side by side (the run's base first, then the other EfficientNet-Lites whose ImageNet weights
are on this machine), all at the run's image size. On every bench set it scored at least as
well on held-out images as the best single base's probe (bench/README.md, issue 22: digits
0.950 against Lite0's 0.900), since the bases, trained at different widths, depths and
resolutions, miss different things. It is judged by the same paired rule as every other
candidate, right after the run's own probe, and kept only when it wins beyond noise. Its
model is plain Keras: the image goes through each base's feature extractor, the pooled
features are concatenated, and one softmax layer reads them."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from transferkit.bases import BASES, build_base, get_base
from transferkit.bases.efficientnet_lite import LITE_VARIANTS
from transferkit.config import DataConfig
from transferkit.data.folders import DataSplits
from transferkit.devices import precision_policy
from transferkit.features import base_features
from transferkit.model import COMBINED_FEATURES, PREDICTIONS, build_feature_extractor, build_head
from transferkit.reporting import Reporter
from transferkit.runs.checkpoints import save_best
from transferkit.training.candidates.protocol import Fitted
from transferkit.training.probe import LinearProbe, fit_probe

if TYPE_CHECKING:
    import keras

    from transferkit.training.loop import Training

COMBINED = "combined"  # the candidate's name, after the run's own probe
COMBINABLE = tuple(LITE_VARIANTS)  # same input scaling; offline ImageNet weights


@dataclass(frozen=True)
class CombinedProbe:
    bases: tuple[str, ...]
    probe: LinearProbe  # over the bases' features side by side, in `bases`' order
    right: np.ndarray  # which val images it got right
    seconds: float  # features of the other bases included


def combinable(base: str, weights: str) -> tuple[str, ...]:
    """The bases a combined candidate would join, the run's first; empty when fewer than
    two are at hand (another base family, other weights, or no second set of weights)."""
    if weights != "imagenet" or base not in COMBINABLE:
        return ()
    others = tuple(name for name in COMBINABLE
                   if name != base and BASES[name].imagenet.available())
    return (base, *others) if others else ()


def fit_combined(bases: Sequence[str], data: DataConfig, image_size: int, splits: DataSplits,
                 own: tuple[np.ndarray, np.ndarray], balanced: bool, reporter: Reporter,
                 use_cache: bool) -> CombinedProbe:
    """The probe on the bases' features side by side, all at the run's `image_size`, C by
    cross-validation on train; `own` are the run's base's train and val features, already
    at hand."""
    start = time.perf_counter()
    at_size = dataclasses.replace(data, image_size=image_size)
    both, n = splits.train.join(splits.val), len(splits.train)
    others = [base_features(name, "imagenet", at_size, both, reporter, use_cache)
              for name in bases[1:]]
    train = np.hstack([own[0], *(f[:n] for f in others)])
    val = np.hstack([own[1], *(f[n:] for f in others)])
    probe = fit_probe(train, splits.train.labels, len(splits.class_names), balanced=balanced,
                      seed=data.seed)
    right = probe.probabilities(val).argmax(axis=1) == splits.val.labels
    return CombinedProbe(tuple(bases), probe, right, time.perf_counter() - start)


def build_combined(combined: CombinedProbe, image_size: int, precision: str) -> keras.Model:
    """The combined candidate as one plain Keras classifier with the probe's weights."""
    import keras

    with precision_policy(precision):
        inputs = keras.Input((image_size, image_size, 3), name="image")
        branches = []
        for name in combined.bases:
            spec = get_base(name)
            extractor = build_feature_extractor(build_base(spec, image_size, "imagenet"),
                                                spec.preprocessing, name=f"features_{name}")
            branches.append(extractor(inputs))
        features = keras.layers.Concatenate(name=COMBINED_FEATURES)(branches)
        kernel, bias = combined.probe.kernel, combined.probe.bias
        head = build_head(*kernel.shape)
        head.get_layer(PREDICTIONS).set_weights([kernel, bias])
        return keras.Model(inputs, head(features), name="classifier")



class CombinedCandidate:
    """The candidates table's row: fitted when the run's base has offline siblings and
    --combine is on."""

    kind = COMBINED
    phase = "the combined candidate"
    after_checks = False
    own_features = False

    def fit(self, run: Training, probe: LinearProbe) -> Fitted | None:
        bases = combinable(run.record.base, run.config.weights) if run.config.combine else ()
        if not bases:
            return None
        (x_train, _), (x_val, _) = run.frozen_features()
        combined = fit_combined(bases, run.config.data, run.record.image_size, run.splits,
                                (x_train, x_val), run.class_weights is not None, run.reporter,
                                run.config.cache)
        size, precision = run.record.image_size, run.record.compute.precision
        return Fitted(COMBINED, combined.right,
                      f"Combined probe on {', '.join(bases)} side by side, "
                      f"C={combined.probe.c:g}", combined.seconds,
                      lambda run: save_best(run.run_dir, build_combined(combined, size,
                                                                        precision), COMBINED),
                      {"bases": list(combined.bases), "c": combined.probe.c})
