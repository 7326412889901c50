"""Assembles classifiers: preprocessing -> base (inference mode) -> pooling -> head.

Every model transferkit saves has the same shape, a `features` model and a `head` model, so
`predict` treats runs from `finetune` and from `extract --train-head` alike.
"""

from __future__ import annotations

import keras
import numpy as np

from transferkit.bases import BaseSpec, Preprocessing


def cut_base(base: keras.Model, spec: BaseSpec, blocks: int | None) -> keras.Model:
    """The base truncated after its first `blocks` blocks (all of it when None)."""
    if blocks is None or blocks == len(spec.blocks):
        return base
    spec.check_block_count(blocks, "--blocks")
    last_block = spec.blocks[blocks - 1]
    last_layer = base.layers[spec.block_spans(base)[last_block][-1]]
    return keras.Model(base.inputs, last_layer.output, name=f"{base.name}_to_{last_block}")


def build_preprocessing(preprocessing: Preprocessing, x: keras.KerasTensor) -> keras.KerasTensor:
    """Raw RGB in [0, 255] -> the scaling the base was trained with, from Keras's own layers
    only, so a saved model loads in any Keras without transferkit: a fixed channel permutation
    (RGB -> BGR for Caffe-style bases) as a frozen bias-free Dense over the channel axis
    (multiplying by exact zeros and ones keeps it exact), then (x - mean) / std per channel as
    a Rescaling by 1/std with offset -mean/std. Rescaling keeps its factors in its config and
    makes them constants of the traced graph, so exports carry them too."""
    if preprocessing.channel_order == "bgr":
        flip = keras.layers.Dense(3, use_bias=False, trainable=False, name="rgb_to_bgr",
                                  kernel_initializer=keras.initializers.Constant(
                                      np.eye(3, dtype="float32")[::-1]))
        x = flip(x)
    scale = [1.0 / s for s in preprocessing.std]
    offset = [-m / s for m, s in zip(preprocessing.mean, preprocessing.std, strict=True)]
    return keras.layers.Rescaling(scale, offset, name="preprocessing")(x)


def build_feature_extractor(base: keras.Model, preprocessing: Preprocessing,
                            pooling: str = "avg", name: str = "features",
                            input_size: int | None = None) -> keras.Model:
    """Raw RGB images -> pooled base features. The base always runs in inference mode, so
    its BatchNorm statistics stay those it was pretrained with, even when unfrozen. With an
    `input_size` other than the base's, the images are resized to the base's size inside
    the model (Keras's Resizing, bilinear)."""
    height, width, channels = base.input_shape[1:]
    if input_size in (None, height):
        inputs = x = keras.Input(base.input_shape[1:], name="image")
    else:
        inputs = keras.Input((input_size, input_size, channels), name="image")
        x = keras.layers.Resizing(height, width, name="resize_for_base")(inputs)
    x = build_preprocessing(preprocessing, x)
    x = base(x, training=False)
    pool = keras.layers.GlobalAveragePooling2D if pooling == "avg" else \
        keras.layers.GlobalMaxPooling2D
    outputs = pool(name="pooling")(x)
    return keras.Model(inputs, outputs, name=name)


def find_base(extractor: keras.Model) -> keras.Model:
    """The convolutional base inside a feature extractor (its only nested model)."""
    return next(layer for layer in extractor.layers if isinstance(layer, keras.Model))


def with_features(model: keras.Model) -> keras.Model:
    """`model` (a classifier transferkit built) with two outputs: the pooled features its
    head reads, and its probabilities; the same layers and weights, one pass."""
    head = model.get_layer("head")
    names = {layer.name for layer in model.layers}
    if "features" in names:  # one base: re-call its features model on the input
        features = model.get_layer("features")(model.inputs[0])
    else:  # several bases side by side (training.candidates.combined): their concatenation
        features = model.get_layer(COMBINED_FEATURES).output
    return keras.Model(model.inputs, [features, head(features)], name="with_features")


COMBINED_FEATURES = "combined_features"  # the layer joining several bases' features
INITIALIZERS = {"he": "he_normal", "glorot": "glorot_uniform"}
PREDICTIONS = "predictions"  # the head's softmax layer


def build_head(feature_dim: int, num_classes: int, dense_units: int = 0, dropout: float = 0.0,
               l2: float = 0.0, init: str = "auto") -> keras.Model:
    """The new classifier: [dense + ReLU] -> dropout -> softmax. Softmax stays float32.

    `init` 'auto' follows the textbook: He for the ReLU layer, Glorot for the softmax layer.
    `l2` penalises the head's kernels (the base is never regularised).
    """
    regularizer = keras.regularizers.L2(l2) if l2 else None
    inputs = keras.Input((feature_dim,), name="features")
    x = inputs
    if dense_units:
        x = keras.layers.Dense(dense_units, activation="relu",
                               kernel_initializer=INITIALIZERS.get(init, "he_normal"),
                               kernel_regularizer=regularizer, name="head_dense")(x)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32",
                                 kernel_initializer=INITIALIZERS.get(init, "glorot_uniform"),
                                 kernel_regularizer=regularizer, name=PREDICTIONS)(x)
    return keras.Model(inputs, outputs, name="head")


def build_classifier(extractor: keras.Model, head: keras.Model) -> keras.Model:
    """Images in, class probabilities out."""
    inputs = keras.Input(extractor.input_shape[1:], name="image")
    return keras.Model(inputs, head(extractor(inputs)), name="classifier")
