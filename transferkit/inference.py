"""A model run over a stream of image batches, for every pass that does not train.

Each pass runs on runtime.py's ONNX Runtime session for the model's weights as they are then,
where it says so; else on one `tf.function` with a batch dimension of None, traced once per
model and input spec and kept with the model for later calls (a Ray worker runs one model
over many tasks).
Keras's `predict` traces again for the last, smaller batch, and each new trace of a base pays
for tracing and TensorFlow's graph optimisation again: about 2 s for Lite0 on 2 CPU cores
(bench/README.md). Memory holds the outputs only, never the images.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from transferkit.reporting import Reporter
from transferkit.runtime import onnx_step

if TYPE_CHECKING:
    import keras
    import tensorflow as tf


_steps: weakref.WeakKeyDictionary[Any, dict[Any, Callable]] = weakref.WeakKeyDictionary()


def inference_step(model: keras.Model, input_spec: tf.TensorSpec, images: int | None = None,
                   reporter: Reporter | None = None, trains: bool = False) -> Callable:
    """`model` in inference mode as one function over batches of `input_spec`, for one pass
    of `images` (None: open-ended, as serve's): runtime.py's ONNX Runtime session for the
    model's weights as they are now, unless TensorFlow must run it, the pass is too short to
    convert for, or the model `trains` (the val passes inside training); else one
    `tf.function`, traced on its first call and reused for every later one (it reads the
    model's weights live)."""
    import tensorflow as tf

    if not trains:
        step = onnx_step(model, input_spec, images, reporter)
        if step is not None:
            return step
    steps = _steps.setdefault(model, {})
    if input_spec not in steps:
        held = weakref.ref(model)  # the step must not keep its model (the table's key) alive
        steps[input_spec] = tf.function(lambda x: held()(x, training=False),
                                        input_signature=[input_spec])
    return steps[input_spec]


def predict_batches(model: keras.Model, ds: tf.data.Dataset, count: int, batch_size: int,
                    reporter: Reporter, description: str) -> Any:
    """`model`'s float32 outputs for every batch of `ds` (`count` inputs in batches of
    `batch_size`, for the progress bar), in order: an array, or a list of arrays for a model
    with several outputs."""
    step = inference_step(model, ds.element_spec, count, reporter)
    several = isinstance(model.output, (list, tuple))
    shapes = model.output_shape if several else [model.output_shape]
    reporter.start_progress(description, math.ceil(count / batch_size))
    rows: list[list[np.ndarray]] = [[] for _ in shapes]
    for batch in ds:
        outputs = step(batch)
        for row, output in zip(rows, outputs if several else [outputs], strict=True):
            row.append(np.asarray(output, dtype=np.float32))
        reporter.advance()
    reporter.stop_progress()
    arrays = [np.concatenate(row) if row else np.zeros((0, *shape[1:]), np.float32)
              for row, shape in zip(rows, shapes, strict=True)]
    return arrays if several else arrays[0]


def val_scores(model: keras.Model, images: Any, labels: np.ndarray,
               batch_size: int | None) -> tuple[float, float]:
    """val_loss and val_accuracy from this process alone (`model` called batch by batch, no
    collective: as the chief of a multi-worker run scores val too); `images` a dataset of
    batches, or an array split into `batch_size` rows."""
    import tensorflow as tf

    if not isinstance(images, tf.data.Dataset):
        images = tf.data.Dataset.from_tensor_slices(images).batch(batch_size or 32)
    step = inference_step(model, images.element_spec, trains=True)
    probabilities = np.concatenate([np.asarray(step(x), np.float32) for x in images])
    return _scores(probabilities, labels)


def _scores(probabilities: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    picked = probabilities[np.arange(len(labels)), labels]
    return (float(-np.mean(np.log(np.clip(picked, 1e-7, 1.0)))),
            float(np.mean(probabilities.argmax(axis=1) == labels)))
