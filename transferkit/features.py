"""Frozen-base features of image sets, computed once. An on-disk cache is keyed by everything
that determines a feature vector (base, weights, image size, cut point, pooling,
preprocessing, precision, and the file's content), so no unchanged image goes through the
base twice and the model is not even built when nothing is missing."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from transferkit.artifacts import FeatureCache
from transferkit.bases import BaseSpec, resolve_weights
from transferkit.data import ImageSet, build_dataset
from transferkit.inference import predict_batches
from transferkit.reporting import Reporter

if TYPE_CHECKING:
    import keras

FEATURE_PIPELINE_VERSION = 2  # bump when decoding or resizing changes what features are


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


def predict_features(model: keras.Model, sources: Sequence[str], image_size: int,
                     batch_size: int, reporter: Reporter, label: str) -> np.ndarray:
    """Runs `model` over the images at `sources` (no augmentation) in one streaming pass."""
    ds = build_dataset(sources, None, image_size, batch_size)
    return predict_batches(model, ds, len(sources), batch_size, reporter,
                           f"Extracting {label} features")


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
        self.reused = 0  # images answered from the cache (or by an identical file)

    @property
    def model(self) -> keras.Model:
        if self._model is None:
            self._model = self._build()
        return self._model

    def features(self, sets: Sequence[ImageSet], label: str) -> list[np.ndarray]:
        """One feature array per image set, a row per image in order. Every image not in
        the cache goes through the base in a single pass; identical files only once."""
        rows: dict[str, np.ndarray] = {}
        todo: dict[str, str] = {}  # content hash -> the first file with that content
        for images in sets:
            for content, source in zip(images.hashes, images.sources, strict=True):
                if content in rows or content in todo:
                    continue
                known = None if self.cache is None else self.cache.get(content)
                if known is None:
                    todo[content] = source
                else:
                    rows[content] = known
        if todo:
            fresh = predict_features(self.model, list(todo.values()), self.spec.image_size,
                                     self.batch_size, self.reporter, label)
            rows.update(zip(todo, fresh, strict=True))
            if self.cache is not None:
                self.cache.put(list(todo), fresh)
        self.computed += len(todo)
        self.reused += sum(len(s) for s in sets) - len(todo)
        width = next(iter(rows.values())).shape[-1] if rows else 0
        return [np.stack([rows[h] for h in s.hashes]) if len(s)
                else np.zeros((0, width), np.float32) for s in sets]

    def save(self) -> None:
        """Writes newly computed features to the cache."""
        if self.cache is not None:
            self.cache.save()
