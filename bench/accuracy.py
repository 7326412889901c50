"""transferkit's default `finetune` against a hand-written Keras script, on the same data.

The hand-written side follows the official Keras transfer-learning guide: frozen base called
with training=False, flip/rotation/zoom augmentation layers, global pooling, dropout 0.2,
softmax; Adam at its default rate; then the whole base unfrozen and trained at 1e-5. Both
sides use the same base and ImageNet weights (efficientnet_lite0), the same image size (224)
and the same epoch budget (transferkit's defaults: 20 + 10); transferkit may stop early.
Both are scored the same way: accuracy of the final model on the validation split.

    python ../shared/bench/make_datasets.py --out /tmp/tk-data tuxpaint photos
    python bench/accuracy.py --data /tmp/tk-data --sets tuxpaint photos --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import transferkit  # noqa: F401  (sets the Keras backend)


def transferkit_accuracy(data: Path, seed: int, workdir: Path) -> tuple[float, float]:
    from transferkit.config import DataConfig, FinetuneConfig
    from transferkit.data.folders import load_splits
    from transferkit.data.pipeline import build_dataset
    from transferkit.runs import load_run
    from transferkit.training.finetune import finetune

    start = time.perf_counter()
    run_dir = workdir / f"tk-{data.name}-{seed}"
    finetune(FinetuneConfig(data=DataConfig(data_dir=data, seed=seed), output=run_dir))
    seconds = time.perf_counter() - start
    run = load_run(run_dir)
    val = load_splits(data, 0.2, seed).val
    ds = build_dataset(val.sources, val.labels, run.image_size, 32)
    run.model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return float(run.model.evaluate(ds, verbose=0)[1]), seconds


def keras_guide_accuracy(data: Path, seed: int, epochs: int, finetune_epochs: int
                         ) -> tuple[float, float]:
    import keras

    from transferkit.bases import BASES, build_base

    start = time.perf_counter()
    keras.utils.set_random_seed(seed)
    size = (224, 224)
    train_ds = keras.utils.image_dataset_from_directory(
        data / "train", image_size=size, batch_size=32, seed=seed, shuffle=True, verbose=False)
    val_ds = keras.utils.image_dataset_from_directory(
        data / "val", image_size=size, batch_size=32, shuffle=False, verbose=False)
    num_classes = len(train_ds.class_names)
    augmentation = keras.Sequential([keras.layers.RandomFlip("horizontal"),
                                     keras.layers.RandomRotation(0.1),
                                     keras.layers.RandomZoom(0.1)])
    base = build_base(BASES["efficientnet_lite0"], 224, "imagenet")
    base.trainable = False
    inputs = keras.Input(size + (3,))
    x = augmentation(inputs)
    x = keras.layers.Rescaling(1 / 128, offset=-127 / 128)(x)  # Lite0's input scaling
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(train_ds, epochs=epochs, validation_data=val_ds, verbose=0)
    base.trainable = True
    model.compile(optimizer=keras.optimizers.Adam(1e-5),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(train_ds, epochs=epochs + finetune_epochs, initial_epoch=epochs,
              validation_data=val_ds, verbose=0)
    return float(model.evaluate(val_ds, verbose=0)[1]), time.perf_counter() - start


def summary(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def main() -> None:
    from transferkit.config import FinetuneConfig, default

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("/tmp/tk-data"))
    parser.add_argument("--sets", nargs="+", default=["tuxpaint", "photos"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--results", type=Path, default=None, help="also write JSON here")
    args = parser.parse_args()
    epochs = default(FinetuneConfig, "epochs")
    finetune_epochs = default(FinetuneConfig, "finetune_epochs")
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets:
            data = args.data / name
            found = results.setdefault(name, {"transferkit": [], "keras_guide": [],
                                               "transferkit_s": [], "keras_guide_s": []})
            for seed in args.seeds:
                acc, secs = transferkit_accuracy(data, seed, Path(tmp))
                found["transferkit"].append(acc)
                found["transferkit_s"].append(secs)
                acc2, secs2 = keras_guide_accuracy(data, seed, epochs, finetune_epochs)
                found["keras_guide"].append(acc2)
                found["keras_guide_s"].append(secs2)
                print(f"{name} seed {seed}: transferkit {acc:.3f} ({secs:.0f} s), "
                      f"keras guide {acc2:.3f} ({secs2:.0f} s)", flush=True)
    print("\n| data | transferkit (mean ± sd) | hand-written Keras (mean ± sd) "
          "| per seed (tk / keras) | mean time tk / keras |")
    print("|---|---|---|---|---|")
    for name, found in results.items():
        per_seed = ", ".join(f"{a:.3f}/{b:.3f}" for a, b in zip(
            found["transferkit"], found["keras_guide"], strict=True))
        print(f"| {name} | {summary(found['transferkit'])} | {summary(found['keras_guide'])} "
              f"| {per_seed} | {statistics.mean(found['transferkit_s']):.0f} s / "
              f"{statistics.mean(found['keras_guide_s']):.0f} s |")
    if args.results:
        args.results.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
