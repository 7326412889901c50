"""How unlike every training class an image is: the "none of these" score.

A classifier trained on N classes answers one of them for anything, with a probability that
can be near 1 for a tree called "cat". The score here adds what the probability cannot see:
how far the image's features lie from the training images' (the cosine distance to its k-th
nearest training image, Sun et al. 2022, "Out-of-distribution detection with deep nearest
neighbors"), next to the calibrated top probability. Each part is put on the scale of known
images (standardised by its mean and spread on val, whose images the bank does not hold), and
the score is their weighted mean, the distance counting twice: about 0 for a typical known
image, growing with strangeness. (bench/novelty.py: with classes held out as unknown, the
2:1 mean beat the top probability on all four sets and the distance alone on three; on
photos the distance alone was best, and an equal mean lost more to it there.)

The threshold is set on val for a stated acceptance rate (0.95: 95 % of known images score
below it). The bank is the train split's features, L2-normalised, float16, at most
MAX_BANK rows (a seeded subsample beyond), saved beside the model as novelty.npz.
"""

from __future__ import annotations

import functools
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferkit.errors import ArtifactError
from transferkit.features import normalise
from transferkit.files import atomic_path, npz_problem

K = 1  # the nearest neighbour; 5 and 10 did no better in bench/novelty.py
WEIGHTS = np.array([2.0, 1.0]) / 3  # of the k-NN distance and of 1 - the top probability
ACCEPT = 0.95  # the share of known (val) images below the threshold
MAX_BANK = 10_000  # rows kept: 10,000 x 1,280 float16 is 26 MB
_CHUNK = 1024  # query rows per distance block: bounded memory for any pool


def knn_distance(bank: np.ndarray, queries: np.ndarray, k: int = K) -> np.ndarray:
    """Cosine distance of each (normalised) query to its k-th nearest row of `bank`."""
    k = min(k, len(bank))
    out = np.empty(len(queries), np.float32)
    for start in range(0, len(queries), _CHUNK):
        similarity = queries[start:start + _CHUNK] @ bank.T
        kth = np.partition(-similarity, k - 1, axis=1)[:, k - 1]
        out[start:start + _CHUNK] = 1.0 + kth  # 1 - (k-th largest similarity)
    return out


def _parts(bank: np.ndarray, k: int, features: np.ndarray, probabilities: np.ndarray
           ) -> np.ndarray:
    distance = knn_distance(bank, normalise(features), k)
    return np.stack([distance, 1.0 - np.asarray(probabilities).max(axis=1)], axis=1)


@dataclass(frozen=True)
class Novelty:
    """A fitted novelty score: the bank, each part's scale on val, the threshold."""

    bank: np.ndarray  # (n, d) float16, rows L2-normalised
    k: int  # the neighbour whose distance counts
    centre: np.ndarray  # (2,) mean on val of [k-NN distance, 1 - top probability]
    spread: np.ndarray  # (2,) their standard deviations on val
    threshold: float
    accept: float  # the share of val at or below the threshold
    val_scores: np.ndarray  # the val images' scores, for the report's distribution

    def parts(self, features: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
        """(n, 2): k-NN distance and 1 - the top probability, each per image."""
        return _parts(self.bank32, self.k, features, probabilities)

    @functools.cached_property
    def bank32(self) -> np.ndarray:
        """The bank as float32, once: the matrix product every batch of queries needs."""
        return self.bank.astype(np.float32)

    def score(self, features: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
        """Higher = less like any training class; about 0 for a typical known image."""
        return ((self.parts(features, probabilities) - self.centre) / self.spread) @ WEIGHTS

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            np.savez(tmp, bank=self.bank, k=np.int64(self.k), centre=self.centre,
                     spread=self.spread,
                     threshold=np.float64(self.threshold), accept=np.float64(self.accept),
                     val_scores=self.val_scores.astype(np.float32))


def fit_novelty(train_features: np.ndarray, val_features: np.ndarray,
                val_probabilities: np.ndarray, accept: float = ACCEPT, seed: int = 0,
                k: int = K) -> Novelty | None:
    """The score fitted on train's features (the bank) and val's (its scale and threshold);
    None when val has fewer than 2 images (nothing to set a scale or threshold with)."""
    if len(val_features) < 2 or len(train_features) < 1:
        return None
    bank = normalise(train_features)
    if len(bank) > MAX_BANK:
        bank = bank[np.random.default_rng(seed).choice(len(bank), MAX_BANK, replace=False)]
    bank = bank.astype(np.float16)
    parts = _parts(bank.astype(np.float32), k, val_features, val_probabilities)
    centre = parts.mean(axis=0)
    spread = np.maximum(parts.std(axis=0), 1e-6)
    scores = ((parts - centre) / spread) @ WEIGHTS
    threshold = float(np.quantile(scores, accept, method="higher"))
    return Novelty(bank, k, centre, spread, threshold, accept, scores.astype(np.float32))


def load_novelty(path: Path, feature_dim: int | None = None) -> Novelty | None:
    """The run's novelty score, or None when the run has none (older runs, tiny val);
    `feature_dim`, when given, is the width the model's features must have.

    Raises:
        ArtifactError: the file is damaged or does not fit the model.
    """
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            values = {name: f[name] for name in ("bank", "k", "centre", "spread", "threshold",
                                                 "accept", "val_scores")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        raise ArtifactError(f"{path} is damaged ({npz_problem(e)}). Train the run again, or "
                            f"delete the file to predict without novelty scores.") from e
    bank = values["bank"]
    shapes_fit = (bank.ndim == 2 and bank.shape[1] == (feature_dim or bank.shape[1])
                  and len(bank) >= 1
                  and values["centre"].shape == (2,) and values["spread"].shape == (2,)
                  and values["threshold"].shape == () and values["k"].shape == ()
                  and 1 <= int(values["k"]) <= 1000 and values["val_scores"].ndim == 1)
    if not shapes_fit or not all(np.isfinite(v).all() for v in values.values()) or \
            (values["spread"] <= 0).any():
        raise ArtifactError(f"{path} does not fit this run's model (features of "
                            f"{feature_dim} values expected) or holds non-finite values. "
                            f"Train the run again, or delete the file to predict without "
                            f"novelty scores.")
    return Novelty(bank.astype(np.float16), int(values["k"]), values["centre"].astype(np.float64),
                   values["spread"].astype(np.float64), float(values["threshold"]),
                   float(values["accept"]), values["val_scores"].astype(np.float32))
