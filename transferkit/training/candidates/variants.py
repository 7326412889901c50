"""The probe variant the data checks pick: the run's probe on the same base's features, taken
where the data suggests they fit better, and judged on val like every candidate.

- **Data unlike the base's pretraining** (the checks found the features fit it badly, e.g.
  handwritten digits): the features after an earlier block, three below the top. Lower
  layers hold more generic features (Yosinski et al. 2014). On digits the probe after
  Lite0's stage5 (block 5 of 8, 112 features) scored 0.920 on test against the top's 0.900,
  and 0.964 against 0.953 on digits_full; one block lower lost 4 points there, and on the
  photo-like tuxpaint10 stage5 lost 5 (bench/README.md).
- **Data like it**: the features of the image upsampled inside the model to 10/7 of the run's
  size (320 px for 224). ImageNet CNNs trained on random-resized crops see objects larger
  than a whole image at the same size shows them, and read a test image best at a higher
  resolution than they were trained at (Touvron et al. 2019, "Fixing the train-test
  resolution discrepancy"). tuxpaint10's Lite0 probe: 0.905 on test at 320 px against 0.873;
  digits' lost 2 points there, which is why the checks choose between the two.

Either model reads images at the run's size like every other candidate (the upsampling is a
Keras Resizing layer inside it), and the features it is fitted on come from that same model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import keras
import numpy as np

from transferkit.bases import BaseSpec
from transferkit.data.folders import DataSplits
from transferkit.features import FeatureExtractor, FeatureModel
from transferkit.model import PREDICTIONS, build_classifier, build_head
from transferkit.reporting import Reporter
from transferkit.runs.checkpoints import save_best
from transferkit.training.candidates.protocol import Fitted
from transferkit.training.probe import LinearProbe, fit_probe

if TYPE_CHECKING:
    from transferkit.training.loop import Training

VARIANT = "variant"  # the row's kind
EARLIER = "earlier-block"  # candidate names
UPSAMPLED = "upsampled"
VARIANTS = (EARLIER, UPSAMPLED)
BLOCKS_BELOW_TOP = 3
UPSAMPLE = 10 / 7  # 224 -> 320


@dataclass(frozen=True)
class VariantProbe:
    name: str
    job: FeatureModel  # what the features come from
    extractor: FeatureExtractor  # computed them; holds the model once it was built
    probe: LinearProbe
    right: np.ndarray  # which val images it got right
    seconds: float  # features included


def pick_variant(deep: bool, spec: BaseSpec, image_size: int) -> tuple[str, int, int] | None:
    """The variant for data the checks found unlike the pretraining (`deep`) or like it:
    (name, blocks, upsample_to); None when the base has too few blocks to cut."""
    if deep:
        blocks = len(spec.blocks) - BLOCKS_BELOW_TOP
        return (EARLIER, blocks, 0) if blocks >= 1 else None
    return UPSAMPLED, len(spec.blocks), 32 * math.ceil(image_size * UPSAMPLE / 32)


def variant_name(job: FeatureModel) -> str:
    """Which variant a picked_job is: upsampled inside the model, or cut below the top."""
    return UPSAMPLED if job.upsample_to else EARLIER


def fit_variant(job: FeatureModel, splits: DataSplits, balanced: bool, reporter: Reporter,
                use_cache: bool) -> VariantProbe:
    """The probe on a variant's features of train (`job`: picked_job's), C by
    cross-validation there."""
    start = time.perf_counter()
    name = variant_name(job)
    extractor = FeatureExtractor.of_model(job, reporter, use_cache)
    train, val = extractor.features([splits.train, splits.val], f"the {name} probe's")
    extractor.save()
    probe = fit_probe(train, splits.train.labels, len(splits.class_names), balanced=balanced,
                      seed=job.seed)
    right = probe.probabilities(val).argmax(axis=1) == splits.val.labels
    return VariantProbe(name, job, extractor, probe, right, time.perf_counter() - start)


def build_variant(variant: VariantProbe) -> keras.Model:
    """The variant as one plain Keras classifier with its probe's weights."""
    return probe_on(variant.extractor, variant.probe)


def probe_on(extractor: FeatureExtractor, probe: LinearProbe) -> keras.Model:
    """One plain Keras classifier: `probe`'s weights on the features `extractor` computes
    (around the features model that computed them, when it was built: not built twice)."""
    head = build_head(*probe.kernel.shape)
    head.get_layer(PREDICTIONS).set_weights([probe.kernel, probe.bias])
    return build_classifier(extractor.model, head)


def picked_job(run: Training) -> FeatureModel | None:
    """The features model of the variant the data checks pick for `run`; None before they
    ran, or when the base has too few blocks to cut."""
    found = run.record.adaptation
    picked = None if found is None else pick_variant(found.deep, run.spec,
                                                     run.record.image_size)
    if picked is None:
        return None
    config = run.config
    _, blocks, upsample_to = picked
    return FeatureModel(run.spec.name, config.weights, config.data.seed, run.record.image_size,
                        run.record.compute.precision, blocks, batch_size=config.data.batch_size,
                        upsample_to=upsample_to)


class VariantCandidate:
    """The candidates table's row: the variant the data checks pick, fitted once they ran."""

    kind = VARIANT
    phase = "the probe variant"
    after_checks = True
    own_features = False

    def fit(self, run: Training, probe: LinearProbe) -> Fitted | None:
        job = picked_job(run)
        if job is None:
            return None
        config = run.config
        variant = fit_variant(job, run.splits, run.class_weights is not None, run.reporter,
                              config.cache)
        where = (f"after block {variant.job.blocks} of {len(run.spec.blocks)}"
                 if variant.name == EARLIER else f"at {variant.job.upsample_to} px")
        return Fitted(variant.name, variant.right,
                      f"Probe on the features {where} (the data checks' pick), "
                      f"C={variant.probe.c:g}", variant.seconds,
                      lambda run: save_best(run.run_dir, build_variant(variant), variant.name),
                      {"blocks": variant.job.blocks,
                       "base_size": variant.job.upsample_to or variant.job.image_size,
                       "c": variant.probe.c})
