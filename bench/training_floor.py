"""Fine-tuning through the whole base: transferkit's Keras path against the training floor,
side by side in one run (issue 36).

- floor: Lite0 at 224 px, every layer but BatchNorm trainable (BatchNorm stays frozen, as in
  transferkit's fine-tuning), with a softmax head, Adam, one plain
  `tf.function` train step (forward, gradients, update) over in-memory float32 batches of 32,
  best of 3 passes of --images images;
- transferkit: `transferkit finetune DATA --unfreeze-blocks 8 --finetune-epochs E --patience
  E` (the whole base), the fine-tuning stage's epochs from history.csv after the first (which
  traces): train images / epoch seconds. An epoch also holds the augmentation, the val pass
  and the callbacks, which the floor has none of: that is the gap this measures.

    python bench/training_floor.py /tmp/tk-data/tuxpaint10
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def floor(images: int) -> float:
    import keras
    import numpy as np
    import tensorflow as tf

    from transferkit.features import FeatureModel

    features = FeatureModel("efficientnet_lite0", "imagenet", 0, 224, "float32", 8).build()
    features.trainable = True
    for layer in features._flatten_layers():  # BatchNorm frozen, as transferkit fine-tunes
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    outputs = keras.layers.Dense(10, activation="softmax")(features.outputs[0])
    model = keras.Model(features.inputs[0], outputs)
    optimizer = keras.optimizers.Adam(1e-4)
    loss = keras.losses.SparseCategoricalCrossentropy()
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (images, 224, 224, 3)).astype(np.float32)
    y = rng.integers(0, 10, images)
    batches = [(tf.constant(x[i:i + 32]), tf.constant(y[i:i + 32]))
               for i in range(0, images, 32)]

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            value = loss(yb, model(xb, training=True))
        grads = tape.gradient(value, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return value

    step(*batches[0])
    best = 0.0
    for _ in range(3):
        began = time.perf_counter()
        for b in batches:
            step(*b).numpy()
        best = max(best, images / (time.perf_counter() - began))
    return best


def keras_path(data: Path, epochs: int, work: Path) -> dict:
    run = work / "run"
    subprocess.run([sys.executable, "-m", "transferkit", "finetune", str(data), "-o", str(run),
                    "--unfreeze-blocks", "8", "--finetune-epochs", str(epochs), "--patience",
                    str(epochs), "--overwrite"], check=True, capture_output=True)
    with open(run / "history.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["stage"] == "finetune"]
    record = json.loads((run / "run.json").read_text())
    train = sum(record["data"]["counts"]["train"].values())
    seconds = [float(r["seconds"]) for r in rows[1:]]
    return {"epoch_seconds": seconds, "train_images": train,
            "median_epoch_s": statistics.median(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--images", type=int, default=192)
    args = parser.parse_args()
    import transferkit  # noqa: F401  (sets the Keras backend)

    with tempfile.TemporaryDirectory() as scratch:
        path = keras_path(args.data, args.epochs, Path(scratch))
    rate = floor(args.images)
    train = path["train_images"]
    keras_rate = train / path["median_epoch_s"]
    print(f"floor: {rate:.1f} images/s; transferkit's epochs after the first: "
          f"{path['epoch_seconds']} s for {train} train images: {keras_rate:.1f} images/s = "
          f"{keras_rate / rate:.2f}x the floor")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
