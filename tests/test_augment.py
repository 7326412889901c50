"""ImageDataGenerator units map onto Keras layers correctly."""

from __future__ import annotations

import math

import numpy as np
import pytest

from transferkit.augment import FILL_MODE, build_augmentation
from transferkit.config import AugmentConfig
from transferkit.errors import ConfigError


def _layers(config: AugmentConfig) -> dict:
    augmentation = build_augmentation(config, seed=1)
    assert augmentation is not None
    return {layer.name: layer.get_config() for layer in augmentation.layers.layers}


def test_classic_recipe_defaults_map_to_one_warp_in_idg_units():
    layers = _layers(AugmentConfig())
    assert list(layers) == ["geometry"]
    geometry = layers["geometry"]
    assert geometry["rotation"] == 40  # degrees, as ImageDataGenerator
    assert geometry["shift"] == (0.2, 0.2)  # height, width fractions
    assert geometry["shear"] == pytest.approx(math.tan(math.radians(0.2)))  # degrees -> coefficient
    assert geometry["zoom"] == 0.2  # each axis in [0.8, 1.2], drawn independently, like IDG
    assert geometry["flip"] == "horizontal" and geometry["fill_mode"] == FILL_MODE == "reflect"


def test_flip_modes_and_disabled_parts():
    config = AugmentConfig(rotation_range=0, width_shift_range=0, height_shift_range=0,
                           shear_range=0, zoom_range=0, horizontal_flip=True, vertical_flip=True)
    layers = _layers(config)
    assert list(layers) == ["geometry"] and layers["geometry"]["flip"] == "horizontal_and_vertical"
    nothing = AugmentConfig(rotation_range=0, width_shift_range=0, height_shift_range=0,
                            shear_range=0, zoom_range=0, horizontal_flip=False)
    assert build_augmentation(nothing) is None
    assert build_augmentation(AugmentConfig(enabled=False)) is None


def _still(**changes: object) -> AugmentConfig:
    return AugmentConfig(**{"rotation_range": 0, "width_shift_range": 0, "height_shift_range": 0,
                            "shear_range": 0, "zoom_range": 0, "horizontal_flip": False,
                            **changes})


def test_one_warp_flips_exactly_and_keeps_a_still_image():
    images = np.random.default_rng(0).uniform(0, 255, (64, 9, 7, 3)).astype(np.float32)
    flipped = np.asarray(build_augmentation(_still(horizontal_flip=True), seed=3)(images))
    mirrored = [np.allclose(o, i[:, ::-1], atol=1e-3) for o, i in zip(flipped, images, strict=True)]
    kept = [np.allclose(o, i, atol=1e-3) for o, i in zip(flipped, images, strict=True)]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True))
    assert 16 < sum(mirrored) < 48  # about half
    upside = np.asarray(build_augmentation(_still(vertical_flip=True), seed=3)(images))
    assert all(np.allclose(o, i[::-1], atol=1e-3) or np.allclose(o, i, atol=1e-3)
               for o, i in zip(upside, images, strict=True))


def test_one_warp_rotates_about_the_centre_and_repeats_with_its_seed():
    image = np.zeros((1, 33, 33, 3), np.float32)
    image[0, 16, 26] = 255.0  # a dot 10 px right of the centre
    turned = build_augmentation(_still(rotation_range=90), seed=5)
    draws = np.asarray(turned(np.repeat(image, 16, axis=0)))
    for draw in draws:  # the dot stays 10 px from the centre, wherever it turned
        y, x = np.unravel_index(draw[..., 0].argmax(), draw.shape[:2])
        assert abs(math.hypot(y - 16, x - 16) - 10) <= 1.0
    assert len({np.unravel_index(d[..., 0].argmax(), d.shape[:2]) for d in draws}) > 4
    again = np.asarray(build_augmentation(_still(rotation_range=90), seed=5)(
        np.repeat(image, 16, axis=0)))
    np.testing.assert_allclose(draws, again)
    centre = np.zeros((16, 33, 33, 3), np.float32)
    centre[:, 16, 16] = 255.0
    shifted = np.asarray(build_augmentation(_still(width_shift_range=0.3), seed=1)(centre))
    places = [np.unravel_index(d[..., 0].argmax(), d.shape[:2]) for d in shifted]
    assert {int(y) for y, _ in places} == {16}  # a horizontal shift keeps the row
    assert all(abs(int(x) - 16) <= 10 for _, x in places) and len({x for _, x in places}) > 4


def test_brightness_is_multiplicative_and_clipped():
    config = AugmentConfig(rotation_range=0, width_shift_range=0, height_shift_range=0,
                           shear_range=0, zoom_range=0, horizontal_flip=False,
                           brightness_range=(0.5, 0.5))
    augmentation = build_augmentation(config, seed=0)
    images = np.full((2, 8, 8, 3), 100.0, np.float32)
    images[1] = 255.0
    out = np.asarray(augmentation(images))
    np.testing.assert_allclose(out[0], 50.0)
    np.testing.assert_allclose(out[1], 127.5)
    brighter = build_augmentation(AugmentConfig(
        rotation_range=0, width_shift_range=0, height_shift_range=0, shear_range=0, zoom_range=0,
        horizontal_flip=False, brightness_range=(2.0, 2.0)))
    assert np.asarray(brighter(images)).max() == 255.0


def test_augmentation_keeps_shape_and_range():
    augmentation = build_augmentation(AugmentConfig(brightness_range=(0.8, 1.2)), seed=3)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    out = np.asarray(augmentation(images))
    assert out.shape == images.shape
    assert out.min() >= 0 and out.max() <= 255
    assert not np.allclose(out, images)


def test_randaugment_runs_its_operations_after_the_geometric_ones_in_a_dataset():
    import tensorflow as tf

    augmentation = build_augmentation(AugmentConfig(randaugment=2, rotation_range=0), seed=4)
    assert [layer.name for layer in augmentation.layers.layers][-1] == "randaugment"
    assert augmentation.layers.layers[-1].get_config()["num_ops"] == 2
    images = np.random.default_rng(1).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices(images).batch(2).map(augmentation)
    out = np.concatenate([np.asarray(b) for b in ds])  # as the training pipeline maps it
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 255
    assert not np.allclose(out, images)
    assert "randaugment" not in _layers(AugmentConfig())  # off unless asked


@pytest.mark.parametrize("kwargs", [{"rotation_range": 400}, {"width_shift_range": 1.5},
                                    {"shear_range": 60}, {"zoom_range": -0.1},
                                    {"brightness_range": (1.2, 0.8)}, {"randaugment": 9}])
def test_out_of_range_values_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        AugmentConfig(**kwargs)


def test_ten_crops_are_the_corners_centre_and_their_mirrors():
    from transferkit.augment import ten_crops

    image = np.arange(5 * 5 * 3, dtype=np.float32).reshape(1, 5, 5, 3)
    views = np.asarray(ten_crops(image, 3))
    assert views.shape == (10, 3, 3, 3)
    expected = [image[0, y:y + 3, x:x + 3] for y, x in ((0, 0), (0, 2), (2, 0), (2, 2), (1, 1))]
    for i, crop in enumerate(expected):
        np.testing.assert_array_equal(views[i], crop)
        np.testing.assert_array_equal(views[i + 5], crop[:, ::-1])


def test_mixup_and_cutmix_mix_images_and_their_one_hot_labels():
    import tensorflow as tf

    from transferkit.augment import build_mixing

    assert build_mixing(AugmentConfig()) is None  # off unless asked
    with pytest.raises(ConfigError, match="--no-augment turns augmentation off"):
        AugmentConfig(mixup=0.2, enabled=False)  # a contradiction, refused
    mix = build_mixing(AugmentConfig(mixup=0.4, cutmix=1.0), seed=2)
    images = np.random.default_rng(2).uniform(0, 255, (8, 16, 16, 3)).astype(np.float32)
    labels = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0, 1, 2, 3]]
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8).map(mix)
    out_images, out_labels = (np.asarray(t) for t in next(iter(ds)))
    assert out_images.shape == images.shape
    np.testing.assert_allclose(out_labels.sum(axis=1), 1.0, atol=1e-5)
    assert (out_labels.max(axis=1) < 1.0 - 1e-3).any()  # some labels are mixtures now
