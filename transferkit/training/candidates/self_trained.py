"""Learning from unlabelled images (`finetune --unlabeled POOL`): class-balanced self-training
of the linear probe on frozen features.

The probe labels the pool; its surest answers join the training labels, the probe is fitted
again, and the next round takes more. Each round takes the same number from every class (the
pool's surest of each), so a class the probe favours cannot swamp the others with its own
mistakes (confirmation bias); ROUNDS rounds take up to SHARE, 2 x SHARE, ... of the pool.
Pool images that the novelty score (novelty.py, fitted on train and val) calls unlike every
class are never pseudo-labelled, so a pool polluted with unrelated images teaches no class
from them.

bench/unlabeled.py measured it against the probe without the pool, pseudo-labels above a
fixed confidence, a curriculum over the whole pool and label spreading (bench/README.md).
The result is a candidate like the others: kept only when it beats the probe on the labelled
val split by more than noise.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from transferkit.novelty import fit_novelty
from transferkit.training.candidates.protocol import Fitted
from transferkit.training.loop import Training, save_probe_model
from transferkit.training.probe import LinearProbe, fit_probe

SELF_TRAINED = "self-trained"  # the candidate's name
ROUNDS = 4
SHARE = 0.25  # of the pool per round, split evenly over the classes


@dataclass(frozen=True)
class PoolLearning:
    """A probe fitted on train's labels and the pool images it was given labels for (by
    self-training here, by co-training in co_trained.py)."""

    probe: LinearProbe
    rows: np.ndarray  # the pool images that trained it
    labels: np.ndarray  # the classes they were given
    unlike: int  # pool images the novelty score kept out
    seconds: float

    @property
    def pseudo_labelled(self) -> int:
        return len(self.rows)

    def per_class(self, num_classes: int) -> tuple[int, ...]:
        """How many pool images each class was given."""
        return tuple(int(n) for n in np.bincount(self.labels, minlength=num_classes))

    def pseudo(self, sources: tuple[str, ...]) -> tuple[tuple[str, ...], np.ndarray]:
        """Those pool images (the files decoded, from the pool's `sources`) with their
        classes: what a pool candidate hands the stages (Fitted.pseudo)."""
        return tuple(sources[i] for i in self.rows), self.labels


def usable_pool(probe: LinearProbe, x_train: np.ndarray, x_val: np.ndarray,
                x_pool: np.ndarray, seed: int) -> np.ndarray:
    """Which pool images may be pseudo-labelled: those the novelty score (fitted on train and
    val) does not call unlike every class."""
    novelty = fit_novelty(x_train, x_val, probe.probabilities(x_val), seed=seed)
    if novelty is None or not len(x_pool):
        return np.ones(len(x_pool), bool)
    return novelty.score(x_pool, probe.probabilities(x_pool)) <= novelty.threshold


def surest_of_each_class(confidence: np.ndarray, answers: np.ndarray, num_classes: int,
                         take: int) -> np.ndarray:
    """Rows of up to `take` images per class, the surest of those answered that class first
    (rows with a negative confidence are never taken)."""
    return np.concatenate([
        members[np.argsort(-confidence[members], kind="stable")[:take]]
        for c in range(num_classes)
        for members in [np.flatnonzero((answers == c) & (confidence >= 0))]])


def self_train(probe: LinearProbe, x_train: np.ndarray, y_train: np.ndarray,
               x_val: np.ndarray, x_pool: np.ndarray, num_classes: int,
               balanced: bool = False, seed: int = 0) -> PoolLearning:
    """`probe` (fitted on train's labels) fitted again, round by round, with the pool's
    surest answers of every class."""
    started = time.perf_counter()
    usable = usable_pool(probe, x_train, x_val, x_pool, seed)
    pool = x_pool[usable]
    per_round = int(SHARE * len(pool) / num_classes)
    chosen, answers = np.zeros(0, int), np.zeros(0, int)
    for round_ in range(1, ROUNDS + 1 if per_round else 1):
        p = probe.probabilities(pool)
        answers = p.argmax(axis=1)
        chosen = surest_of_each_class(p.max(axis=1), answers, num_classes, per_round * round_)
        probe = fit_probe(np.vstack([x_train, pool[chosen]]), np.r_[y_train, answers[chosen]],
                          num_classes, balanced, seed)
    return PoolLearning(probe, np.flatnonzero(usable)[chosen], answers[chosen],
                        int((~usable).sum()), time.perf_counter() - started)


class SelfTrainedCandidate:
    """The candidates table's row: fitted with --unlabeled. When it wins, a linear head
    starts the stages from it (it is saved into the run's model)."""

    kind = SELF_TRAINED
    phase = "self-training on the unlabelled pool"
    after_checks = False
    own_features = True

    def fit(self, run: Training, probe: LinearProbe) -> Fitted | None:
        pool = run.pool
        if pool is None:
            return None
        (x_train, y_train), (x_val, y_val) = run.frozen_features()
        x_pool = run.pool_features()
        trained = self_train(probe, x_train, y_train, x_val, x_pool, len(run.splits.class_names),
                             balanced=run.class_weights is not None, seed=run.config.data.seed)
        right = trained.probe.probabilities(x_val).argmax(axis=1) == y_val
        return Fitted(SELF_TRAINED, right,
                      f"Self-trained probe, {trained.pseudo_labelled} of {len(pool.images)} "
                      f"pool images pseudo-labelled and {trained.unlike} left out as unlike "
                      f"every class, C={trained.probe.c:g}", trained.seconds,
                      lambda run: save_probe_model(run, trained.probe, SELF_TRAINED),
                      {"pool": str(run.config.unlabeled), "images": len(pool.images),
                       "unreadable": len(pool.unreadable),
                       "pseudo_labelled": trained.pseudo_labelled, "unlike": trained.unlike,
                       "c": trained.probe.c},
                      trained.pseudo(pool.images.sources))
