"""ImageDataGenerator-style augmentation options -> Keras 3 preprocessing layers.

The units differ and are converted here, once: ImageDataGenerator takes rotation and shear in
degrees and zoom as a range around 1; Keras's RandomRotation takes a fraction of a full turn,
RandomShear a shear coefficient (the tangent of the angle) and RandomZoom an offset from 1.
Brightness is multiplicative in ImageDataGenerator (Keras's RandomBrightness adds), so it is
applied as a product here. Fill mode is 'reflect' (Keras's layers' own default):
ImageDataGenerator's 'nearest' smears the border pixels into streaks at every edge.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import keras

from transferkit.config import AugmentConfig

if TYPE_CHECKING:
    import tensorflow as tf

FILL_MODE = "reflect"


def build_augmentation_layers(config: AugmentConfig, seed: int | None = None) -> keras.Sequential:
    """The geometric part, in ImageDataGenerator's order: rotate, shift, shear, zoom, flip;
    then RandAugment's operations when asked."""
    layers: list[keras.layers.Layer] = []
    if config.rotation_range:
        layers.append(keras.layers.RandomRotation(
            config.rotation_range / 360.0, fill_mode=FILL_MODE, seed=seed, name="rotation"))
    if config.width_shift_range or config.height_shift_range:
        layers.append(keras.layers.RandomTranslation(
            config.height_shift_range, config.width_shift_range, fill_mode=FILL_MODE, seed=seed,
            name="shift"))
    if config.shear_range:
        layers.append(keras.layers.RandomShear(
            x_factor=math.tan(math.radians(config.shear_range)), y_factor=0.0,
            fill_mode=FILL_MODE, seed=seed, name="shear"))
    if config.zoom_range:
        zoom = (-config.zoom_range, config.zoom_range)
        layers.append(keras.layers.RandomZoom(zoom, zoom, fill_mode=FILL_MODE, seed=seed,
                                              name="zoom"))
    flip = {(True, False): "horizontal", (False, True): "vertical",
            (True, True): "horizontal_and_vertical"}.get(
        (config.horizontal_flip is not False, config.vertical_flip))
    if flip:
        layers.append(keras.layers.RandomFlip(flip, seed=seed, name="flip"))
    if config.randaugment:
        layers.append(keras.layers.RandAugment(value_range=(0, 255), num_ops=config.randaugment,
                                               seed=seed, name="randaugment"))
    return keras.Sequential(layers, name="augmentation")


class Augmentation:
    """Callable on a batch of float RGB images in [0, 255] (training batches only)."""

    def __init__(self, config: AugmentConfig, seed: int | None = None) -> None:
        self.layers = build_augmentation_layers(config, seed)
        self.brightness_range = config.brightness_range
        self.seed = seed

    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        import tensorflow as tf

        x = self.layers(images, training=True) if self.layers.layers else images
        if self.brightness_range is not None:
            low, high = self.brightness_range
            factor = tf.random.uniform([tf.shape(x)[0], 1, 1, 1], low, high, seed=self.seed)
            x = tf.clip_by_value(x * factor, 0.0, 255.0)
        return x


def build_mixing(config: AugmentConfig, seed: int | None = None
                 ) -> Callable[[Any, Any], tuple[Any, Any]] | None:
    """MixUp, then CutMix, as asked, on a batch of images and its one-hot labels (Keras's
    layers); None when neither is on."""
    layers: list[keras.layers.Layer] = []
    if config.enabled and config.mixup:
        layers.append(keras.layers.MixUp(alpha=config.mixup, seed=seed))
    if config.enabled and config.cutmix:
        layers.append(keras.layers.CutMix(factor=config.cutmix, seed=seed))
    if not layers:
        return None

    def mix(images: Any, labels: Any) -> tuple[Any, Any]:
        batch = {"images": images, "labels": labels}
        for layer in layers:
            batch = layer(batch, training=True)
        return batch["images"], batch["labels"]

    return mix


def build_augmentation(config: AugmentConfig, seed: int | None = None) -> Augmentation | None:
    """The augmentation to apply to training batches, or None when it is off or empty."""
    augmentation = Augmentation(config, seed)
    if not config.enabled or (not augmentation.layers.layers and config.brightness_range is None):
        return None
    return augmentation


TTA_VIEWS = 10
TTA_SCALE = 256 / 224  # AlexNet cropped 224 px views from images resized to 256


def tta_load_size(image_size: int) -> int:
    """The size to read images at for test-time crops of `image_size`."""
    return round(image_size * TTA_SCALE)


def ten_crops(images: tf.Tensor, size: int) -> tf.Tensor:
    """Test-time views, AlexNet-style: [B, L, L, 3] -> [B * 10, size, size, 3], each image's
    four corner crops and centre crop, then the same five mirrored left to right."""
    import tensorflow as tf

    far = tf.shape(images)[1] - size
    middle = far // 2
    crops = [images[:, y:y + size, x:x + size]
             for y, x in ((0, 0), (0, far), (far, 0), (far, far), (middle, middle))]
    views = crops + [tf.reverse(crop, axis=[2]) for crop in crops]
    return tf.reshape(tf.stack(views, axis=1), [-1, size, size, 3])
