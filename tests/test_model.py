"""Assembled models: preprocessing inside, softmax out, and safe-mode saving."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from transferkit.bases import CAFFE, LITE, get_base
from transferkit.model import (
    build_classifier,
    build_feature_extractor,
    build_head,
    build_preprocessing,
)


def _scaled(preprocessing, pixels: list[float]) -> np.ndarray:
    inputs = keras.Input((1, 1, 3))
    model = keras.Model(inputs, build_preprocessing(preprocessing, inputs))
    return model.predict(np.array([[[pixels]]], np.float32), verbose=0)[0, 0, 0]


def test_caffe_preprocessing_flips_to_bgr_and_centres_with_built_in_layers():
    out = _scaled(CAFFE, [10.0, 20.0, 30.0])
    np.testing.assert_allclose(out, [30 - 103.939, 20 - 116.779, 10 - 123.68], rtol=1e-6)
    np.testing.assert_allclose(_scaled(LITE, [0.0, 127.0, 255.0]), [-127 / 128, 0, 1])


def test_the_preprocessing_layers_are_keras_own_and_fixed():
    spec = get_base("vgg16")
    extractor = build_feature_extractor(spec.build((32, 32, 3)), spec.preprocessing)
    flip, scale = extractor.get_layer("rgb_to_bgr"), extractor.get_layer("preprocessing")
    assert type(flip).__module__.startswith("keras.") and not flip.trainable
    assert type(scale).__module__.startswith("keras.") and not scale.trainable_weights


def test_classifier_outputs_probabilities_and_reloads_in_safe_mode(tmp_path: Path):
    spec = get_base("efficientnet_lite0")
    base = spec.build((32, 32, 3))
    extractor = build_feature_extractor(base, spec.preprocessing)
    model = build_classifier(extractor, build_head(spec.feature_dim, 3, dense_units=8,
                                                   dropout=0.5))
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    probabilities = model.predict(images, verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True, compile=False)
    np.testing.assert_allclose(reloaded.predict(images, verbose=0), probabilities, rtol=1e-5)
    assert reloaded.get_layer("head").get_layer("predictions").dtype_policy.name == "float32"
