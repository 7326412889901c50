"""Grad-CAM (Selvaraju et al. 2017): where in an image the model looked for a class. The
gradient of the class's log-probability with respect to the base's last feature map,
averaged over the map, weighs its channels; their weighted sum, through a ReLU, is the map.
Written here because it is a dozen lines over the model transferkit builds (preprocessing,
base, pooling, head); keras ships no Grad-CAM layer."""

from __future__ import annotations

from typing import Any

import numpy as np

from transferkit.data.pipeline import build_dataset


def has_feature_map(model: Any) -> bool:
    """Whether `model` is a single classifier of the shape transferkit builds (an averaged
    cv ensemble is not: it has one feature map per fold)."""
    names = {layer.name for layer in model.layers}
    return {"features", "head"} <= names


def gradcam(model: Any, sources: list[str], classes: np.ndarray, image_size: int
            ) -> np.ndarray:
    """One map per image, (n, h, w) in [0, 1] at the base's feature-map resolution, for
    `classes[i]` of image `sources[i]`."""
    import keras
    import tensorflow as tf

    features, head = model.get_layer("features"), model.get_layer("head")
    images = np.concatenate([np.asarray(b) for b in build_dataset(
        sources, None, image_size, max(1, len(sources)))])
    x = tf.convert_to_tensor(images, tf.float32)
    with tf.GradientTape() as tape:
        t = x
        for layer in features.layers[1:-1]:  # up to the pooling layer: the feature map
            t = layer(t, training=False) if isinstance(layer, keras.Model) else layer(t)
        feature_map = tf.cast(t, tf.float32)
        tape.watch(feature_map)
        pooled = features.layers[-1](feature_map)
        probabilities = tf.cast(head(pooled, training=False), tf.float32)
        picked = tf.gather(probabilities, classes.astype(np.int32), axis=1, batch_dims=1)
        score = tf.math.log(picked + 1e-9)
    grads = tape.gradient(score, feature_map)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cams = tf.nn.relu(tf.reduce_sum(weights * feature_map, axis=-1)).numpy()
    peak = cams.reshape(len(cams), -1).max(axis=1).reshape(-1, 1, 1)
    return np.where(peak > 0, cams / np.maximum(peak, 1e-12), 0.0)
