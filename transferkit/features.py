"""Frozen-base features of image sets, computed once. An on-disk cache is keyed by everything
that determines a feature vector (base, weights, image size, cut point, pooling,
preprocessing, precision, and the file's content), so no unchanged image goes through the
base twice and the model is not even built when nothing is missing."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from transferkit.artifacts import FeatureCache
from transferkit.bases import BaseSpec, resolve_weights
from transferkit.callbacks import PredictProgress
from transferkit.data import ImageSet, build_dataset
from transferkit.reporting import Reporter

if TYPE_CHECKING:
    import keras

FEATURE_PIPELINE_VERSION = 1  # bump when decoding or resizing changes what features are


def weights_fingerprint(spec: BaseSpec, weights: str, seed: int) -> str:
    """What identifies the base's weights: the weights file's content hash, or the seed that
    drew random ones."""
    path = resolve_weights(spec, weights)
    if path is None:
        return f"random:{seed}"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class FeatureSpec:
    """Everything that determines an image's feature vector, except the image."""

    base: str
    weights: str  # fingerprint
    image_size: int
    blocks: int
    pooling: str
    preprocessing: dict[str, Any]
    precision: str  # resolved: float32 | mixed (float16 activations give other values)

    def key(self) -> str:
        payload = json.dumps({**asdict(self), "version": FEATURE_PIPELINE_VERSION},
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:24]


def predict_features(model: keras.Model, images: ImageSet, image_size: int, batch_size: int,
                     reporter: Reporter, label: str) -> np.ndarray:
    """Runs `model` over `images` (no augmentation) in one streaming `predict` call."""
    ds = build_dataset(images.sources, None, image_size, batch_size)
    reporter.start_progress(f"Extracting {label} features", math.ceil(len(images) / batch_size))
    features = model.predict(ds, verbose=0, callbacks=[PredictProgress(reporter)])
    reporter.stop_progress()
    return features.astype(np.float32)


class FeatureExtractor:
    """Features for image sets, through the cache; builds the model only when needed."""

    def __init__(self, build: Callable[[], keras.Model], spec: FeatureSpec, batch_size: int,
                 reporter: Reporter, use_cache: bool = True) -> None:
        self._build = build
        self._model: keras.Model | None = None
        self.spec = spec
        self.batch_size = batch_size
        self.reporter = reporter
        self.cache = FeatureCache(spec.key()) if use_cache else None
        self.computed = 0  # images pushed through the base
        self.reused = 0  # images answered from the cache

    @property
    def model(self) -> keras.Model:
        if self._model is None:
            self._model = self._build()
        return self._model

    def features(self, images: ImageSet, label: str) -> np.ndarray:
        """One feature row per image of `images`, in order."""
        known = [None if self.cache is None else self.cache.get(h) for h in images.hashes]
        missing = np.array([k is None for k in known], dtype=bool)
        rows: list[np.ndarray | None] = list(known)
        if missing.any():
            todo = images.subset(missing)
            fresh = predict_features(self.model, todo, self.spec.image_size, self.batch_size,
                                     self.reporter, label)
            for i, row in zip(np.flatnonzero(missing), fresh, strict=True):
                rows[i] = row
            if self.cache is not None:
                self.cache.put(todo.hashes, fresh)
        self.computed += int(missing.sum())
        self.reused += int((~missing).sum())
        if not rows:
            return np.zeros((0, 0), np.float32)
        return np.stack(rows).astype(np.float32)  # type: ignore[arg-type]

    def save(self) -> None:
        """Writes newly computed features to the cache."""
        if self.cache is not None:
            self.cache.save()
