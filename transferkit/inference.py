"""A model run over a stream of image batches, for extract, predict and evaluate.

One `tf.function` with a batch dimension of None is traced once per call. Keras's `predict`
traces again for the last, smaller batch, and each trace of a base costs seconds: that was a
tenth of extracting 1,000 images on 2 CPU cores (bench/README.md). Memory holds the outputs
only, never the images.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from transferkit.reporting import Reporter

if TYPE_CHECKING:
    import keras
    import tensorflow as tf


def predict_batches(model: keras.Model, ds: tf.data.Dataset, count: int, batch_size: int,
                    reporter: Reporter, description: str) -> np.ndarray:
    """`model`'s float32 outputs for every batch of `ds` (`count` inputs in batches of
    `batch_size`, for the progress bar), in order."""
    import tensorflow as tf

    step = tf.function(lambda x: model(x, training=False), input_signature=[ds.element_spec])
    reporter.start_progress(description, math.ceil(count / batch_size))
    rows = []
    for batch in ds:
        rows.append(np.asarray(step(batch), dtype=np.float32))
        reporter.advance()
    reporter.stop_progress()
    if not rows:
        return np.zeros((0, *model.output_shape[1:]), np.float32)
    return np.concatenate(rows)
