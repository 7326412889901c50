"""The tf.data pipeline: encoded files -> batches of float RGB in [0, 255] at the model's
size, decoded in parallel ahead of the model. Only files that data.inspect found native reach
it directly; the others come through their converted copies."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import tensorflow as tf

def load_image(path: tf.Tensor, image_size: int) -> tf.Tensor:
    """One encoded file -> float32 RGB in [0, 255] at `image_size` square (aspect squashed).

    Only files `inspect_image` found native reach here directly (others via their converted
    copy), so grey and palette images are all that need expanding to 3 channels. Two savings
    that keep the picture: a JPEG at least twice the size on its short side is decoded at 1/2,
    1/4 or 1/8 scale (libjpeg scales in the DCT, instead of decoding every pixel to throw most
    away), and the resize antialiases only when it shrinks an axis more than 2x. Below that,
    bilinear sampling reads every source pixel already, and the filter is costly: reading,
    decoding and resizing a 256 px JPEG to 224 took 3.6 ms with it and 1.1 ms without, on one
    core.
    """
    import tensorflow as tf

    return decode_image(tf.io.read_file(path), image_size)


def decode_image(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """load_image for bytes already read (a scalar string tensor)."""
    import tensorflow as tf

    image = tf.cond(tf.io.is_jpeg(encoded), lambda: _decode_jpeg_scaled(encoded, image_size),
                    lambda: tf.io.decode_image(encoded, channels=3, expand_animations=False))
    image.set_shape([None, None, 3])
    size = [image_size, image_size]
    return tf.cond(tf.reduce_max(tf.shape(image)[:2]) > 2 * image_size,
                   lambda: tf.image.resize(image, size, antialias=True),
                   lambda: tf.image.resize(image, size))


JPEG_SCALES = (1, 2, 4, 8)  # the ratios libjpeg can decode at


def _decode_jpeg_scaled(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """The JPEG decoded at the largest ratio that keeps its short side >= image_size."""
    import tensorflow as tf

    short = tf.reduce_min(tf.io.extract_jpeg_shape(encoded)[:2])
    index = tf.add_n([tf.cast(short >= r * image_size, tf.int32) for r in JPEG_SCALES[1:]])

    def decoder(ratio: int) -> Callable[[], tf.Tensor]:
        return lambda: tf.io.decode_jpeg(encoded, channels=3, ratio=ratio)

    return tf.switch_case(index, [decoder(r) for r in JPEG_SCALES])


def _parallel_calls() -> int:
    return max(2, os.cpu_count() or 1)


def build_dataset(sources: Sequence[str], labels: np.ndarray | None, image_size: int,
                  batch_size: int, shuffle_seed: int | None = None,
                  augment: Callable[[tf.Tensor], tf.Tensor] | None = None,
                  replicas: int = 1) -> tf.data.Dataset:
    """Batched (image, label) pairs, or images alone when `labels` is None; `augment` maps
    each batch of images. A shuffled dataset for `replicas` > 1 replicas keeps a multiple of
    them per pass (dropping fewer than `replicas` images, different ones each pass), since a
    distributed step fails on a last batch that does not split evenly across them.

    Decoding runs in parallel ahead of the model. Parallelism is set explicitly with autotune
    off: on small CPU machines autotune can stall for seconds at the end of every pass.
    """
    import tensorflow as tf

    parallel = _parallel_calls()
    # File names as the OS's bytes: a name that is not valid UTF-8 reads back exactly.
    names = [os.fsencode(s) for s in sources]
    items = (names,) if labels is None else (names, np.asarray(labels, np.int32))
    ds = tf.data.Dataset.from_tensor_slices(items)
    if shuffle_seed is not None:
        ds = ds.shuffle(len(sources), seed=shuffle_seed, reshuffle_each_iteration=True)
        ds = ds.take(len(sources) - len(sources) % replicas)
    if labels is None:
        ds = ds.map(lambda p: load_image(p, image_size), num_parallel_calls=parallel)
    else:
        ds = ds.map(lambda p, y: (load_image(p, image_size), y), num_parallel_calls=parallel)
    ds = ds.batch(batch_size)
    # Augmentation draws from seeded random state: batches take their draws one after the
    # other, so the same seed gives the same run (in parallel calls the order in which they
    # reach that state varies). It works on whole batches, so it stays cheap beside the base.
    if augment is not None and labels is None:
        ds = ds.map(augment)
    elif augment is not None:
        ds = ds.map(lambda x, y: (augment(x), y))
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.prefetch(2).with_options(options)

