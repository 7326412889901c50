"""ImageDataGenerator-style augmentation options -> Keras 3 layers.

The geometric options (rotation and shear in degrees, shifts as fractions, zoom as a range
around 1, flips) are drawn per image and applied as one warp (RandomGeometry). Brightness is
multiplicative in ImageDataGenerator (Keras's RandomBrightness adds), so it is applied as a
product here. Fill mode is 'reflect' (Keras's layers' own default): ImageDataGenerator's
'nearest' smears the border pixels into streaks at every edge.
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


class RandomGeometry(keras.layers.Layer):
    """ImageDataGenerator's geometric augmentation as one warp: per image, a rotation of up to
    `rotation` degrees, a shift of up to `shift` (height, width) of the image, a shear with
    coefficient up to `shear`, a zoom of each axis in [1 - zoom, 1 + zoom] drawn independently,
    and flips (`flip`: "horizontal", "vertical", "horizontal_and_vertical" or None), composed
    into one affine map about the image's centre and applied by one bilinear
    `keras.ops.image.affine_transform` with `fill_mode` at the edges.

    Why not Keras's RandomRotation, RandomTranslation, RandomShear, RandomZoom and RandomFlip
    in a row: each resamples the whole batch, and five resamplings of 224 px batches cost 6.2 s
    of an epoch of 1,079 images on 2 cores, against the base's 16 s training step
    (bench/training_floor.py, issue 36); one warp costs a fifth of that, and interpolates once
    instead of five times."""

    def __init__(self, rotation: float = 0.0, shift: tuple[float, float] = (0.0, 0.0),
                 shear: float = 0.0, zoom: float = 0.0, flip: str | None = None,
                 fill_mode: str = FILL_MODE, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rotation, self.shift, self.shear, self.zoom = rotation, tuple(shift), shear, zoom
        self.flip, self.fill_mode, self.seed = flip, fill_mode, seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def _uniform(self, n: Any, bound: float) -> Any:
        return keras.random.uniform((n,), -bound, bound, seed=self.seed_generator)

    def _sign(self, n: Any, axis: str) -> Any:
        if self.flip is None or axis not in self.flip:
            return keras.ops.ones((n,))
        coin = keras.random.uniform((n,), 0.0, 1.0, seed=self.seed_generator)
        return keras.ops.where(coin < 0.5, -1.0, 1.0)

    def call(self, images: Any, training: bool = True) -> Any:
        if not training:
            return images
        ops = keras.ops
        shape = ops.shape(images)
        n = shape[0]
        height, width = ops.cast(shape[1], "float32"), ops.cast(shape[2], "float32")
        angle = self._uniform(n, math.radians(self.rotation))
        cos, sin = ops.cos(angle), ops.sin(angle)
        k = self._uniform(n, self.shear)
        zx = (1.0 + self._uniform(n, self.zoom)) * self._sign(n, "horizontal")
        zy = (1.0 + self._uniform(n, self.zoom)) * self._sign(n, "vertical")
        # output pixel p -> input pixel c + R(angle) @ Shear(k) @ diag(zx, zy) @ (p - c) + t
        # (a flip is the sign of the zoom), as affine_transform's [a0 a1 a2 b0 b1 b2 0 0]
        a0, a1 = cos * zx, (cos * k - sin) * zy
        b0, b1 = sin * zx, (sin * k + cos) * zy
        cx, cy = (width - 1.0) / 2.0, (height - 1.0) / 2.0
        a2 = cx + self._uniform(n, self.shift[1]) * width - a0 * cx - a1 * cy
        b2 = cy + self._uniform(n, self.shift[0]) * height - b0 * cx - b1 * cy
        zeros = ops.zeros((n,))
        transform = ops.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)
        return ops.image.affine_transform(images, transform, interpolation="bilinear",
                                          fill_mode=self.fill_mode)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "rotation": self.rotation, "shift": self.shift,
                "shear": self.shear, "zoom": self.zoom, "flip": self.flip,
                "fill_mode": self.fill_mode, "seed": self.seed}


def build_augmentation_layers(config: AugmentConfig, seed: int | None = None) -> keras.Sequential:
    """The geometric part (RandomGeometry: rotate, shift, shear, zoom, flip, in one warp), then
    RandAugment's operations when asked."""
    layers: list[keras.layers.Layer] = []
    flip = {(True, False): "horizontal", (False, True): "vertical",
            (True, True): "horizontal_and_vertical"}.get(
        (config.horizontal_flip is not False, config.vertical_flip))
    shift = (config.height_shift_range, config.width_shift_range)
    if config.rotation_range or any(shift) or config.shear_range or config.zoom_range or flip:
        layers.append(RandomGeometry(
            config.rotation_range, shift, math.tan(math.radians(config.shear_range)),
            config.zoom_range, flip, seed=seed, name="geometry"))
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
