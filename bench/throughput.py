"""Speed and memory of transferkit's pipeline, as ratios measured side by side in one run.

    python bench/throughput.py            # about 50 minutes on 2 CPU cores

Passes take turns in rounds (--repeats, --stage1-repeats) and each ratio is of medians: on a
shared 2-core machine a 20 s pass varies by a quarter between minutes, so one pass of each
side is not enough to compare them.

1. The extraction pass of the real `extract` command over a folder of JPEGs (decoded, resized
   and pushed through a freshly built base, its first batch paying for the trace) / the
   compute floor (the same extractor's `predict` on in-memory tensors, same size and batch,
   traced beforehand): efficientnet_lite0 at 224 and vgg16 at 150 (target >= 0.9). The floor
   is the faster of Keras's `predict` on the array and a traced call per ready-made batch.
   The whole command, which also checks every file and builds the model, is reported beside
   it; so is transferkit's input pipeline feeding the already traced model (the steady
   state, without the pass's one-off trace), and that pipeline with tf.data's AUTOTUNE
   instead of transferkit's explicit parallelism (see ../shared/PERF_NOTES.md).
2. The older books' way (Keras's legacy ImageDataGenerator.flow_from_directory feeding
   `predict`) / transferkit's extract pass, reported.
3. A second `extract` on unchanged data vs the first (target >= 20x faster).
4. Stage 1 with --no-augment (head on cached features) vs the same epochs through the base
   (target >= 10x faster), whole `finetune --finetune-epochs 0` commands, each started with
   no features cached (the ImageNet weights are converted once beforehand, as for any user).
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
from collections.abc import Callable, Iterable
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


def timed(fn) -> float:
    """Wall time of fn()."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Each run's seconds over `repeats` rounds, the runs taking turns within each round, so
    that the slow drifts of a shared machine fall on every side alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(run())
    return times


def spread(seconds: list[float]) -> str:
    return "/".join(f"{t:.1f}" for t in seconds)


def extract_config(data: Path, out: Path, base: str, size: int, weights: str, cache: bool):
    from transferkit.config import DataConfig, ExtractConfig

    return ExtractConfig(data=DataConfig(data_dir=data, image_size=size), output=out, base=base,
                         weights=weights, cache=cache, overwrite=True)


class PassClock(NullReporter):
    """Times the extraction pass of an `extract` command: from its "Extracting ..." progress
    bar's start to its end."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start: float | None = None

    def start_progress(self, description: str, total: int | None) -> None:
        self._start = time.perf_counter() if description.startswith("Extracting") else None

    def stop_progress(self) -> None:
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start


def extraction_times(data: Path, base: str, size: int, weights: str, work: Path,
                     repeats: int) -> dict[str, list[float]]:
    """Seconds per pass over the `data` folder's images, six ways, interleaved."""
    import tensorflow as tf

    # The older books' way; Keras 3 keeps the class only in its legacy package.
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    from transferkit.bases import build_base, get_base
    from transferkit.commands.extract import extract
    from transferkit.data.folders import load_splits
    from transferkit.data.pipeline import build_dataset, load_image
    from transferkit.inference import inference_step
    from transferkit.model import build_feature_extractor

    spec = get_base(base)
    model = build_feature_extractor(build_base(spec, size, weights), spec.preprocessing)
    images = load_splits(data, 0.2, 0)
    sources = [*images.train.sources, *images.val.sources]
    tensors = np.random.default_rng(0).uniform(0, 255, (len(sources), size, size, 3))
    tensors = tensors.astype(np.float32)
    # Two floors: Keras's predict on the in-memory array (as the issue words it), and a
    # traced call per ready-made batch, which skips predict's copy of the array; the faster
    # is the floor.
    batches = [tf.constant(tensors[i:i + 32]) for i in range(0, len(tensors), 32)]
    step = inference_step(model, tf.TensorSpec((None, size, size, 3), tf.float32))
    model.predict(tensors[:32], batch_size=32, verbose=0)  # both traced before any clock runs
    step(batches[0])

    def run_traced(stream: Iterable[tf.Tensor]) -> None:
        for batch in stream:
            step(batch).numpy()

    def autotuned() -> tf.data.Dataset:  # the tf.data guide's defaults
        return (tf.data.Dataset.from_tensor_slices(sources)
                .map(lambda p: load_image(p, size), num_parallel_calls=tf.data.AUTOTUNE)
                .batch(32).prefetch(tf.data.AUTOTUNE))

    def legacy() -> None:
        generator = ImageDataGenerator().flow_from_directory(
            str(data), target_size=(size, size), batch_size=32, class_mode=None, shuffle=False)
        model.predict(generator, verbose=0)

    passes: list[float] = []

    def command() -> float:
        clock = PassClock()
        seconds = timed(lambda: extract(extract_config(data, work / "f.npz", base, size,
                                                       weights, cache=False), clock))
        passes.append(clock.seconds)
        return seconds

    times = interleaved({
        "predict": lambda: timed(lambda: model.predict(tensors, batch_size=32, verbose=0)),
        "traced": lambda: timed(lambda: run_traced(batches)),
        "pipeline": lambda: timed(lambda: run_traced(build_dataset(sources, None, size, 32))),
        "autotune": lambda: timed(lambda: run_traced(autotuned())),
        "command": command,
        "legacy": lambda: timed(legacy),
    }, repeats)
    return {**times, "extract": passes}


def cache_ratio(data: Path, work: Path) -> tuple[float, float]:
    from transferkit.cache import clear_cache
    from transferkit.commands.extract import extract

    clear_cache()  # no features cached; the converted ImageNet weights stay, as for any user

    def run() -> float:
        return timed(lambda: extract(extract_config(data, work / "c.npz", "efficientnet_lite0",
                                                    224, "imagenet", cache=True)))

    return run(), run()


def stage1_times(data: Path, work: Path, epochs: int, repeats: int) -> dict[str, list[float]]:
    """Whole `finetune --finetune-epochs 0` commands: stage 1 on cached features (--no-augment)
    and the same epochs through the base, taking turns, each starting with no features cached."""
    from transferkit.cache import clear_cache
    from transferkit.commands.finetune import finetune
    from transferkit.config import AugmentConfig, DataConfig, FinetuneConfig

    def run(name: str, augment: AugmentConfig) -> Callable[[], float]:
        config = FinetuneConfig(data=DataConfig(data_dir=data), output=work / name, epochs=epochs,
                                finetune_epochs=0, patience=0, augment=augment, overwrite=True)

        def cold() -> float:
            clear_cache()
            return timed(lambda: finetune(config))

        return cold

    # The same epochs through the base: augmentation on, every transform set to nothing.
    nothing = AugmentConfig(rotation_range=0, width_shift_range=0, height_shift_range=0,
                            shear_range=0, zoom_range=0, horizontal_flip=False)
    return interleaved({"fast": run("fast", AugmentConfig(enabled=False)),
                        "images": run("images", nothing)}, repeats)


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
    from transferkit.commands.finetune import finetune
    from transferkit.config import AugmentConfig, DataConfig, FinetuneConfig
    from transferkit.model import build_classifier, build_feature_extractor, build_head

    clock = EpochClock()

    class Clocked(NullReporter):
        def stage_started(self, stage) -> None:
            clock.start()

        def epoch_ended(self, *args) -> None:
            clock.tick()

    finetune(FinetuneConfig(data=DataConfig(data_dir=data), output=work / "aug", epochs=epochs,
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
from transferkit.commands.extract import extract
extract(ExtractConfig(data=DataConfig(data_dir=Path(sys.argv[1]), image_size=64),
                      output=Path(sys.argv[2]), cache=False, overwrite=True))
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
    parser.add_argument("--repeats", type=int, default=5,
                        help="interleaved rounds of the extraction passes (default 5)")
    parser.add_argument("--stage1-repeats", type=int, default=3,
                        help="interleaved rounds of the two stage-1 commands (default 3)")
    args = parser.parse_args()
    median = statistics.median
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        os.environ["TRANSFERKIT_HOME"] = str(work / "home")
        rows = []
        # Folders big enough for ~20 s passes at each base's floor rate.
        large = make_jpegs(work / "jpegs1000", 1000)
        for base, size, weights, folder in (("efficientnet_lite0", 224, "imagenet", large),
                                            ("vgg16", 150, "none",
                                             make_jpegs(work / "jpegs160", 160, seed=1))):
            t = extraction_times(folder, base, size, weights, work, args.repeats)
            floor = min(median(t["predict"]), median(t["traced"]))
            rows.append((f"extract pass / compute floor, {base} at {size}",
                         floor / median(t["extract"]), ">= 0.9",
                         f"{sum(1 for _ in folder.rglob('*.jpg'))} images; seconds per pass "
                         f"{spread(t['extract'])} vs floor: predict {spread(t['predict'])}, "
                         f"traced {spread(t['traced'])}; against predict alone "
                         f"{median(t['predict']) / median(t['extract']):.2f}; whole command "
                         f"{floor / median(t['command']):.2f}"))
            rows.append((f"input pipeline feeding the traced model / compute floor, {base} "
                         f"at {size}", floor / median(t["pipeline"]), "report",
                         f"{spread(t['pipeline'])} s"))
            rows.append((f"the same pipeline with tf.data AUTOTUNE / with transferkit's "
                         f"explicit parallelism (time), {base} at {size}",
                         median(t["autotune"]) / median(t["pipeline"]), "report",
                         f"{spread(t['autotune'])} s vs {spread(t['pipeline'])} s"))
            rows.append((f"legacy ImageDataGenerator + predict / transferkit's extract pass "
                         f"(speed), {base} at {size}", median(t["extract"]) / median(t["legacy"]),
                         "report", f"{spread(t['legacy'])} s vs {spread(t['extract'])} s"))
            print(*rows[-4:], sep="\n", flush=True)
        first, second = cache_ratio(large, work)
        rows.append(("second extract vs first (unchanged data)", first / second, ">= 20",
                     f"{first:.1f} s vs {second:.2f} s"))
        print(rows[-1], flush=True)
        medium = make_jpegs(work / "jpegs300", 300, seed=2)
        t = stage1_times(medium, work, 30, args.stage1_repeats)
        rows.append(("stage 1 through the base / with --no-augment (30 epochs)",
                     median(t["images"]) / median(t["fast"]), ">= 10",
                     f"{spread(t['images'])} s vs {spread(t['fast'])} s"))
        print(rows[-1], flush=True)
        ours, plain = augmented_epochs(medium, work)
        rows.append(("stage-1 epoch with augmentation / plain Keras fit", ours / plain,
                     "<= 1.0", f"{ours:.1f} s vs {plain:.1f} s per epoch"))
        print(rows[-1], flush=True)
        rss_small = peak_rss_kb(make_jpegs(work / "jpegs500", 500, seed=3), work / "r1.npz")
        rss_big = peak_rss_kb(make_jpegs(work / "jpegs5000", 5000, seed=4), work / "r2.npz")
        rows.append(("peak RSS of extract, 5,000 vs 500 images", rss_big / rss_small, "<= 1.3",
                     f"{rss_big / 1024:.0f} MB vs {rss_small / 1024:.0f} MB"))
        print(f"\nmedians of interleaved rounds ({args.repeats} for extraction, "
              f"{args.stage1_repeats} for stage 1)")
        print("| measure | ratio | target | detail |\n|---|---|---|---|")
        for name, ratio, target, detail in rows:
            print(f"| {name} | {ratio:.2f} | {target} | {detail} |")


if __name__ == "__main__":
    main()
