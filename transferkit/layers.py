"""Registered, serializable Keras layers that transferkit puts inside saved models, so a
model loads in Keras's safe mode (no Lambda layers, nothing executed from the file)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="transferkit")
class ImagePreprocessing(keras.layers.Layer):
    """Raw RGB in [0, 255] -> the scaling a base was trained with: optional RGB->BGR, then
    (x - mean) / std per channel."""

    def __init__(self, channel_order: str = "rgb", mean: Sequence[float] = (0.0, 0.0, 0.0),
                 std: Sequence[float] = (1.0, 1.0, 1.0), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if channel_order not in ("rgb", "bgr"):
            raise ValueError(f"channel_order must be 'rgb' or 'bgr'; got {channel_order!r}")
        self.channel_order = channel_order
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def call(self, inputs: Any) -> Any:
        x = ops.cast(inputs, self.compute_dtype)
        if self.channel_order == "bgr":
            x = ops.flip(x, axis=-1)
        mean = ops.convert_to_tensor(self.mean, dtype=self.compute_dtype)
        std = ops.convert_to_tensor(self.std, dtype=self.compute_dtype)
        return (x - mean) / std

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "channel_order": self.channel_order,
                "mean": list(self.mean), "std": list(self.std)}
