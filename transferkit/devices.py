"""What the hardware offers: mixed precision on GPUs that support it, XLA, and data-parallel
training across local GPUs (tf.distribute)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from transferkit.errors import ConfigError
from transferkit.workers import MULTIWORKER, multiworker_strategy

if TYPE_CHECKING:
    import tensorflow as tf

MIXED_POLICY = "mixed_float16"
MIN_MIXED_CAPABILITY = (7, 0)  # Volta and newer have float16 tensor cores


def visible_gpus() -> list:
    """The GPUs TensorFlow sees."""
    import tensorflow as tf

    return tf.config.list_physical_devices("GPU")


def resolve_precision(precision: str) -> str:
    """'auto' -> 'mixed' on a GPU with tensor cores, else 'float32'."""
    if precision != "auto":
        return precision
    import tensorflow as tf

    for gpu in visible_gpus():
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        if capability and tuple(capability) >= MIN_MIXED_CAPABILITY:
            return "mixed"
    return "float32"


@contextlib.contextmanager
def precision_policy(precision: str) -> Iterator[str]:
    """Builds layers under the resolved policy (their dtypes are fixed when built), then
    restores the previous global policy. Yields the resolved precision."""
    import keras

    resolved = resolve_precision(precision)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(MIXED_POLICY if resolved == "mixed" else "float32")
    try:
        yield resolved
    finally:
        keras.mixed_precision.set_global_policy(previous)


def build_strategy(name: str) -> tf.distribute.Strategy:
    """none: the default (one device); mirrored: all local GPUs (or CPU); auto: mirrored when
    there is more than one GPU, else none; multiworker: every worker TF_CONFIG lists (read,
    and checked first, when the strategy is made)."""
    import tensorflow as tf

    if name == "auto":
        name = "mirrored" if len(visible_gpus()) > 1 else "none"
    if name == "none":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == MULTIWORKER:
        return multiworker_strategy()
    raise ConfigError(f"Unknown strategy '{name}'.")
