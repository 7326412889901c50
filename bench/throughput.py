"""Speed and memory of transferkit's pipeline, as ratios measured side by side in one run.

    python bench/throughput.py            # about 15-20 minutes on 2 CPU cores

1. extract images/s over a folder of JPEGs / the compute floor (the same extractor's
   `predict` on in-memory tensors, same size and batch): efficientnet_lite0 at 224 and
   vgg16 at 150 (target >= 0.9). The rate is that of the real `extract` command's
   extraction pass (JPEGs decoded, resized and pushed through a freshly built base, its
   first batch paying for the trace); the whole command, which also checks every file
   and builds the model, is reported beside it. So is the input pipeline with tf.data's
   AUTOTUNE instead of transferkit's explicit parallelism (see ../shared/PERF_NOTES.md).
2. The older books' way (Keras's legacy ImageDataGenerator.flow_from_directory feeding
   `predict`) / transferkit's pipeline, reported.
3. A second `extract` on unchanged data vs the first (target >= 20x faster).
4. Stage 1 with --no-augment (head on cached features) vs the same epochs through the base
   (target >= 10x faster), whole `finetune --finetune-epochs 0` commands.
5. A stage-1 epoch with augmentation vs a plain Keras `fit` of the same model on
   image_dataset_from_directory with the same augmentation layers (target <= 1.0).
6. Peak RSS of `extract` on 5,000 images vs 500 (target <= 1.3x), in fresh processes.

ImageNet weights matter for accuracy, not speed: VGG16 runs with random weights here (its
ImageNet file cannot be downloaded on these machines); Lite0 with its bundled ImageNet ones.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import transferkit  # noqa: F401  (sets the Keras backend)
from transferkit.reporting import NullReporter

PICTURES = ("astronaut", "chelsea", "coffee", "rocket")


def make_jpegs(root: Path, count: int, size: int = 256, seed: int = 0) -> Path:
    """`count` distinct JPEGs in two class folders: random crops of scikit-image photos."""
    import skimage.data

    rng = np.random.default_rng(seed)
    sources = [np.asarray(Image.fromarray(getattr(skimage.data, p)()).convert("RGB"))
               for p in PICTURES]
    for i in range(count):
        picture = sources[i % len(sources)]
        side = int(rng.integers(size, min(picture.shape[:2]) + 1))
        y = int(rng.integers(0, picture.shape[0] - side + 1))
        x = int(rng.integers(0, picture.shape[1] - side + 1))
        crop = Image.fromarray(picture[y:y + side, x:x + side]).resize((size, size))
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        crop.save(folder / f"{i:05d}.jpg", quality=90)
    return root


def timed(fn, repeats: int = 1) -> float:
    """Best-of-`repeats` wall time of fn() (best-of damps this shared machine's noise)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def extract_config(data: Path, out: Path, base: str, size: int, weights: str, cache: bool):
    from transferkit.config import DataConfig, ExtractConfig

    return ExtractConfig(data=DataConfig(data, image_size=size), output=out, base=base,
                         weights=weights, cache=cache, overwrite=True)


class PassClock(NullReporter):
    """Times the extraction passes of an `extract` command (one per split): from each
    "Extracting ..." progress bar's start to its end."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start: float | None = None

    def start_progress(self, description: str, total: int | None) -> None:
        self._start = time.perf_counter() if description.startswith("Extracting") else None

    def stop_progress(self) -> None:
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start


def extraction_ratios(data: Path, n: int, base: str, size: int, weights: str, work: Path
                      ) -> dict[str, float | str]:
    import tensorflow as tf

    from transferkit.bases import build_base, get_base
    from transferkit.data import build_dataset, load_image, load_splits
    from transferkit.extract import extract
    from transferkit.model import build_feature_extractor

    spec = get_base(base)
    model = build_feature_extractor(build_base(spec, size, weights), spec.preprocessing)
    tensors = np.random.default_rng(0).uniform(0, 255, (n, size, size, 3)).astype(np.float32)
    model.predict(tensors[:32], batch_size=32, verbose=0)  # trace once
    floor = timed(lambda: model.predict(tensors, batch_size=32, verbose=0), repeats=3)
    images = load_splits(data, 0.2, 0)
    sources = [*images.train.sources, *images.val.sources]

    def autotuned() -> tf.data.Dataset:  # the tf.data guide's defaults
        return (tf.data.Dataset.from_tensor_slices(sources)
                .map(lambda p: load_image(p, size), num_parallel_calls=tf.data.AUTOTUNE)
                .batch(32).prefetch(tf.data.AUTOTUNE))

    ours, tuned = [], []
    for _ in range(3):  # interleaved; means, since the stalls come and go
        ours.append(timed(lambda: model.predict(build_dataset(sources, None, size, 32),
                                                verbose=0)))
        tuned.append(timed(lambda: model.predict(autotuned(), verbose=0)))
    passes, commands = [], []
    for _ in range(2):
        clock, start = PassClock(), time.perf_counter()
        extract(extract_config(data, work / "f.npz", base, size, weights, cache=False), clock)
        commands.append(time.perf_counter() - start)
        passes.append(clock.seconds)

    # The older books' way; Keras 3 keeps the class only in its legacy package.
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    def legacy() -> None:
        generator = ImageDataGenerator().flow_from_directory(
            str(data), target_size=(size, size), batch_size=32, class_mode=None, shuffle=False)
        model.predict(generator, verbose=0)

    legacy_time = timed(legacy, repeats=2)
    return {"floor_img_s": n / floor, "pipeline_img_s": n / min(ours),
            "autotune_slowdown": statistics.mean(tuned) / statistics.mean(ours),
            "autotune_runs": " / ".join(f"{t:.1f}" for t in tuned),
            "explicit_runs": " / ".join(f"{t:.1f}" for t in ours),
            "extract_img_s": n / min(passes), "command_img_s": n / min(commands),
            "legacy_img_s": n / legacy_time}


def cache_ratio(data: Path, work: Path) -> tuple[float, float]:
    from transferkit.extract import extract

    os.environ["TRANSFERKIT_HOME"] = str(work / "fresh-cache")  # an empty cache
    first = timed(lambda: extract(extract_config(data, work / "c.npz", "efficientnet_lite0",
                                                 224, "imagenet", cache=True)))
    second = timed(lambda: extract(extract_config(data, work / "c.npz", "efficientnet_lite0",
                                                  224, "imagenet", cache=True)))
    return first, second


def stage1_times(data: Path, work: Path, epochs: int) -> tuple[float, float]:
    from transferkit.config import AugmentConfig, DataConfig, FinetuneConfig
    from transferkit.training import finetune

    def run(name: str, augment: AugmentConfig) -> float:
        os.environ["TRANSFERKIT_HOME"] = str(work / f"cache-{name}")  # both start cold
        config = FinetuneConfig(data=DataConfig(data), output=work / name, epochs=epochs,
                                finetune_epochs=0, patience=0, augment=augment, overwrite=True)
        return timed(lambda: finetune(config))

    # The same epochs through the base: augmentation on, every transform set to nothing.
    nothing = AugmentConfig(rotation_range=0, width_shift_range=0, height_shift_range=0,
                            shear_range=0, zoom_range=0, horizontal_flip=False)
    return run("fast", AugmentConfig(enabled=False)), run("images", nothing)


class EpochClock:
    """Epoch durations of a run, from the reporter's or Keras's epoch-end events."""

    def __init__(self) -> None:
        self.stamps = [time.perf_counter()]

    def start(self, *args, **kwargs) -> None:
        self.stamps = [time.perf_counter()]

    def tick(self, *args, **kwargs) -> None:
        self.stamps.append(time.perf_counter())

    def steady(self) -> float:
        """Median epoch time after the first (which pays for tracing)."""
        return statistics.median(np.diff(self.stamps)[1:])


def augmented_epochs(data: Path, work: Path, epochs: int = 4) -> tuple[float, float]:
    import keras

    from transferkit.augment import build_augmentation_layers
    from transferkit.bases import build_base, get_base
    from transferkit.config import AugmentConfig, DataConfig, FinetuneConfig
    from transferkit.model import build_classifier, build_feature_extractor, build_head
    from transferkit.training import finetune

    clock = EpochClock()

    class Clocked(NullReporter):
        def stage_started(self, stage) -> None:
            clock.start()

        def epoch_ended(self, *args) -> None:
            clock.tick()

    finetune(FinetuneConfig(data=DataConfig(data), output=work / "aug", epochs=epochs,
                            finetune_epochs=0, patience=0, overwrite=True), Clocked())
    ours = clock.steady()

    spec = get_base("efficientnet_lite0")
    base = build_base(spec, 224, "imagenet")
    base.trainable = False
    inputs = keras.Input((224, 224, 3))
    x = build_augmentation_layers(AugmentConfig(), seed=0)(inputs)
    outputs = build_classifier(build_feature_extractor(base, spec.preprocessing),
                               build_head(spec.feature_dim, 2, dropout=0.2))(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    train = keras.utils.image_dataset_from_directory(data, image_size=(224, 224), batch_size=32,
                                                     seed=0, validation_split=0.2,
                                                     subset="training", verbose=False)
    val = keras.utils.image_dataset_from_directory(data, image_size=(224, 224), batch_size=32,
                                                   seed=0, validation_split=0.2,
                                                   subset="validation", verbose=False)
    plain = EpochClock()
    model.fit(train, validation_data=val, epochs=epochs, verbose=0,
              callbacks=[keras.callbacks.LambdaCallback(on_train_begin=plain.start,
                                                        on_epoch_end=plain.tick)])
    return ours, plain.steady()


RSS_SCRIPT = """
import resource, sys
from pathlib import Path
from transferkit.config import DataConfig, ExtractConfig
from transferkit.extract import extract
extract(ExtractConfig(data=DataConfig(Path(sys.argv[1]), image_size=64), output=Path(sys.argv[2]),
                      cache=False, overwrite=True))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_kb(data: Path, out: Path) -> int:
    done = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(data), str(out)],
                          capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: temp)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        os.environ["TRANSFERKIT_HOME"] = str(work / "home")
        rows = []
        # Folders big enough for ~20 s passes at each base's floor rate.
        large = make_jpegs(work / "jpegs1000", 1000)
        for base, size, weights, n_dir in (("efficientnet_lite0", 224, "imagenet", large),
                                           ("vgg16", 150, "none",
                                            make_jpegs(work / "jpegs160", 160, seed=1))):
            n = sum(1 for _ in n_dir.rglob("*.jpg"))
            r = extraction_ratios(n_dir, n, base, size, weights, work)
            rows.append((f"extract / compute floor, {base} at {size}",
                         r["extract_img_s"] / r["floor_img_s"], ">= 0.9",
                         f"{r['extract_img_s']:.1f} vs {r['floor_img_s']:.1f} img/s; whole "
                         f"command {r['command_img_s'] / r['floor_img_s']:.2f}; predict over "
                         f"the tf.data pipeline {r['pipeline_img_s'] / r['floor_img_s']:.2f}"))
            rows.append((f"pipeline with tf.data AUTOTUNE / transferkit's explicit "
                         f"parallelism (time, mean of 3), {base} at {size}",
                         r["autotune_slowdown"], "report",
                         f"{r['autotune_runs']} s vs {r['explicit_runs']} s"))
            rows.append((f"legacy ImageDataGenerator / transferkit, {base} at {size}",
                         r["legacy_img_s"] / r["pipeline_img_s"], "report",
                         f"{r['legacy_img_s']:.1f} vs {r['pipeline_img_s']:.1f} img/s"))
            print(*rows[-3:], sep="\n", flush=True)
        first, second = cache_ratio(large, work)
        rows.append(("second extract vs first (unchanged data)", first / second, ">= 20",
                     f"{first:.1f} s vs {second:.2f} s"))
        print(rows[-1], flush=True)
        medium = make_jpegs(work / "jpegs300", 300, seed=2)
        fast, slow = stage1_times(medium, work, epochs=30)
        rows.append(("stage 1 through the base / with --no-augment (30 epochs)", slow / fast,
                     ">= 10", f"{slow:.0f} s vs {fast:.1f} s"))
        print(rows[-1], flush=True)
        ours, plain = augmented_epochs(medium, work)
        rows.append(("stage-1 epoch with augmentation / plain Keras fit", ours / plain,
                     "<= 1.0", f"{ours:.1f} s vs {plain:.1f} s per epoch"))
        print(rows[-1], flush=True)
        rss_small = peak_rss_kb(make_jpegs(work / "jpegs500", 500, seed=3), work / "r1.npz")
        rss_big = peak_rss_kb(make_jpegs(work / "jpegs5000", 5000, seed=4), work / "r2.npz")
        rows.append(("peak RSS of extract, 5,000 vs 500 images", rss_big / rss_small, "<= 1.3",
                     f"{rss_big / 1024:.0f} MB vs {rss_small / 1024:.0f} MB"))
        print("\n| measure | ratio | target | detail |\n|---|---|---|---|")
        for name, ratio, target, detail in rows:
            print(f"| {name} | {ratio:.2f} | {target} | {detail} |")


if __name__ == "__main__":
    main()
