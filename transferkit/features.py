"""Frozen-base features of image sets, computed once, and the feature cache. The cache is
keyed by everything that determines a feature vector (base, weights, image size, cut point,
pooling, preprocessing, precision, and the file's content), so no unchanged image goes
through the base twice and the model is not even built when nothing is missing. Feature files
(`extract -o`) are feature_files.py's."""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from transferkit.bases import BaseSpec, resolve_weights
from transferkit.cache import FEATURES, cache_path
from transferkit.data.folders import ImageSet
from transferkit.data.pipeline import build_dataset
from transferkit.files import atomic_path
from transferkit.inference import predict_batches
from transferkit.raybatch import run_on_ray
from transferkit.reporting import NullReporter, Reporter

if TYPE_CHECKING:
    import keras

    from transferkit.config import DataConfig, EngineConfig

FEATURE_PIPELINE_VERSION = 2  # bump when decoding or resizing changes what features are


def normalise(features: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length (float32 at least), so dot products are cosine
    similarities."""
    x = np.asarray(features, np.result_type(features, np.float32))
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


RANDOM_INIT_VERSION = 2  # bump when a builder draws fresh weights differently (2: Lite's He)


def weights_fingerprint(spec: BaseSpec, weights: str, seed: int) -> str:
    """What identifies the base's weights: the weights file's content hash, or the seed that
    drew random ones (and how they were drawn)."""
    path = resolve_weights(spec, weights)
    if path is None:
        return f"random:{seed}:v{RANDOM_INIT_VERSION}"
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
    upsample_to: int = 0  # the base reads the image resized to this inside the model (0: no)

    def key(self) -> str:
        fields = asdict(self)
        if not self.upsample_to:  # so the keys of features cached before it stay valid
            del fields["upsample_to"]
        payload = json.dumps({**fields, "version": FEATURE_PIPELINE_VERSION}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:24]


def predict_features(model: keras.Model, sources: Sequence[str], image_size: int,
                     batch_size: int, reporter: Reporter, label: str,
                     augment: Callable[[Any], Any] | None = None) -> np.ndarray:
    """Runs `model` over the images at `sources` in one streaming pass (augmented draws of
    them with `augment`)."""
    ds = build_dataset(sources, None, image_size, batch_size, augment=augment)
    return predict_batches(model, ds, len(sources), batch_size, reporter,
                           f"Extracting {label} features")


@dataclass(frozen=True)
class FeatureModel:
    """A base's features model, up to `blocks` of its blocks and pooled, as a recipe that
    this process or a Ray worker (raybatch.BatchJob) builds and runs the same way. With
    `upsample_to`, the model reads images of `image_size` and resizes them to that for the
    base (a Keras Resizing layer inside it)."""

    base: str
    weights: str  # as given: imagenet, none, or a weights file
    seed: int  # draws random weights, when they are
    image_size: int
    precision: str  # resolved
    blocks: int
    pooling: str = "avg"
    batch_size: int = 32
    upsample_to: int = 0

    def build(self) -> keras.Model:
        import keras

        from transferkit.bases import build_base, get_base
        from transferkit.devices import precision_policy
        from transferkit.model import build_feature_extractor, cut_base

        spec = get_base(self.base)
        keras.utils.set_random_seed(self.seed)
        with precision_policy(self.precision):
            size = self.upsample_to or self.image_size
            base = cut_base(build_base(spec, size, self.weights), spec, self.blocks)
            return build_feature_extractor(base, spec.preprocessing, self.pooling,
                                           input_size=self.image_size)

    def run(self, model: keras.Model, sources: list[str]) -> np.ndarray:
        return predict_features(model, sources, self.image_size, self.batch_size,
                                NullReporter(), self.base)


class FeatureExtractor:
    """Features for image sets, through the cache; builds the model only when needed, or
    sends the images the cache lacks to a Ray cluster (`engine`, with a FeatureModel)."""

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
        self.remote: tuple[FeatureModel, EngineConfig] | None = None  # of_model with ray

    @classmethod
    def of_base(cls, build: Callable[[], keras.Model], spec: BaseSpec, weights: str, seed: int,
                image_size: int, precision: str, batch_size: int, reporter: Reporter,
                use_cache: bool = True, blocks: int | None = None, pooling: str = "avg",
                upsample_to: int = 0) -> FeatureExtractor:
        """The extractor of `spec`'s features with `weights` (drawn from `seed` when random),
        pooled after `blocks` of its blocks (all by default)."""
        feature_spec = FeatureSpec(spec.name, weights_fingerprint(spec, weights, seed),
                                   image_size, blocks or len(spec.blocks), pooling,
                                   spec.preprocessing.to_dict(), precision, upsample_to)
        return cls(build, feature_spec, batch_size, reporter, use_cache)

    @classmethod
    def of_model(cls, job: FeatureModel, reporter: Reporter, use_cache: bool = True,
                 engine: EngineConfig | None = None) -> FeatureExtractor:
        """The extractor of `job`'s features, computed here or on Ray (--engine ray)."""
        from transferkit.bases import get_base

        extractor = cls.of_base(job.build, get_base(job.base), job.weights, job.seed,
                                job.image_size, job.precision, job.batch_size, reporter,
                                use_cache, job.blocks, job.pooling, job.upsample_to)
        if engine is not None and engine.engine == "ray":
            extractor.remote = (job, engine)
        return extractor

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
            fresh = run_on_ray(self.remote[0], list(todo.values()), self.remote[1],
                               self.reporter, f"Extracting {label} features") \
                if self.remote is not None else \
                predict_features(self.model, list(todo.values()), self.spec.image_size,
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


def base_features(base: str, weights: str, data: DataConfig, images: ImageSet,
                  reporter: Reporter, use_cache: bool = True,
                  engine: EngineConfig | None = None) -> np.ndarray:
    """The pooled features of the whole `base` (at the data's image size, or the base's own)
    for `images`, through the feature cache (on Ray with `engine` ray): what audit, select
    and base ranking compare images by."""
    from transferkit.bases import get_base, resolve_image_size
    from transferkit.devices import resolve_precision

    spec = get_base(base)
    job = FeatureModel(base, weights, data.seed, resolve_image_size(spec, data.image_size),
                       resolve_precision("auto"), len(spec.blocks), batch_size=data.batch_size)
    extractor = FeatureExtractor.of_model(job, reporter, use_cache, engine)
    (features,) = extractor.features([images], f"{spec.name}")
    extractor.save()
    reporter.info(f"{spec.name} features: {extractor.computed} images computed, "
                  f"{extractor.reused} from the cache.")
    return features


class FeatureCache:
    """Features already computed for one extractor (base, weights, size, cut point, pooling,
    preprocessing), by image content hash: one .npz of plain arrays per extractor."""

    def __init__(self, key: str) -> None:
        self.path = cache_path(FEATURES) / f"{key}.npz"
        self.index: dict[str, int] = {}
        self.rows: list[np.ndarray] = []
        self.changed = False
        try:
            with np.load(self.path, allow_pickle=False) as npz:
                features = npz["features"]
                self.index = {str(h): i for i, h in enumerate(npz["hashes"])}
                self.rows = list(features)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # no cache yet, or a damaged one: start afresh

    def get(self, content_hash: str) -> np.ndarray | None:
        i = self.index.get(content_hash)
        return None if i is None else self.rows[i]

    def put(self, hashes: Sequence[str], features: np.ndarray) -> None:
        for h, row in zip(hashes, features, strict=True):
            if h not in self.index:
                self.index[h] = len(self.rows)
                self.rows.append(row)
                self.changed = True

    def save(self) -> None:
        if not self.changed:
            return
        hashes = np.array(sorted(self.index, key=self.index.__getitem__))
        with atomic_path(self.path) as tmp:
            np.savez(tmp, hashes=hashes, features=np.stack(self.rows).astype(np.float32))
