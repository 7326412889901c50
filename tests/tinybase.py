"""A tiny base for tests about plumbing, not about a base: three small conv blocks, 32 px by
default, built from Keras's own layers (its runs load in plain Keras). Tracing, saving and
restoring it takes a fraction of Lite0's time. `register` adds it to transferkit's bases
table for the test session (conftest) or a subprocess a test starts; it is never part of
the product. Tests about a real base (its blocks, weights, BatchNorm) keep Lite0."""

from __future__ import annotations

from transferkit.bases import BASES, TF, BaseSpec, starting
from transferkit.errors import WeightsError

NAME = "tiny"
WIDTHS = (8, 16, 32)


class _NoImagenet:
    def available(self) -> bool:
        return False

    def path(self):  # noqa: ANN201
        raise WeightsError("The tests' tiny base has no ImageNet weights; use --weights none.")


def _build(input_shape: tuple[int, int, int]):  # noqa: ANN202
    import keras

    inputs = keras.Input(input_shape)
    x = inputs
    for i, width in enumerate(WIDTHS, start=1):
        x = keras.layers.Conv2D(width, 3, strides=2, padding="same", use_bias=False,
                                name=f"block{i}_conv")(x)
        x = keras.layers.BatchNormalization(name=f"block{i}_bn")(x)
        x = keras.layers.ReLU(name=f"block{i}_relu")(x)
    return keras.Model(inputs, x, name="tiny")


def _params() -> int:
    channels, total = 3, 0
    for width in WIDTHS:
        total += 9 * channels * width + 4 * width  # conv kernel, BatchNorm's four vectors
        channels = width
    return total


SPEC = BaseSpec(name=NAME, build=_build, imagenet=_NoImagenet(), preprocessing=TF,
                default_size=32, min_size=16, feature_dim=WIDTHS[-1], params=_params(),
                block_markers=starting(*(f"block{i}_" for i in range(1, len(WIDTHS) + 1))))


def register() -> None:
    BASES.setdefault(NAME, SPEC)
