"""transferkit's default `finetune` against its anchors, on the same images, split and
EfficientNet-Lite0 ImageNet weights, side by side in one run:

- transferkit: `transferkit finetune DATA --seed S` as users run it, one process per seed,
  with its defaults (plus any --tk-option, for trying a variant, passed as a --config file);
- probe: scikit-learn's logistic regression on the frozen pooled features `extract` writes,
  C chosen by 5-fold cross-validation on the training split (LogisticRegressionCV, log loss);
  timed from a cold feature cache, extraction included;
- keras_guide: the official Keras transfer-learning guide as a script: the frozen base called
  with training=False, flip/rotation/zoom augmentation layers, pooling, dropout 0.2, softmax,
  Adam at its default rate for 20 epochs; then the whole base unfrozen at 1e-5 for 10
  (--guide-epochs sets other budgets);
- fastai: fastai's own recipe as its docs write it: `ImageDataLoaders.from_folder` with
  `Resize(224)` and `aug_transforms()`, `vision_learner` (its concat-pool head) and
  `fine_tune(10, freeze_epochs=1)`, on a PyTorch port of the same Lite0 checkpoint
  (bench/lite0_torch.py). Needs the bench extra: pip install -e ".[bench]".

Each side is scored on DATA/test when the set has one (tuxpaint10), else on DATA/val, and
nothing chooses on the test split. Times are whole wall-clock seconds on this machine.

    python ../shared/bench/make_datasets.py --out /tmp/tk-data tuxpaint tuxpaint10 photos
    python bench/accuracy.py --sets tuxpaint10 tuxpaint photos --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import transferkit  # noqa: F401  (sets the Keras backend)

GUIDE_EPOCHS, GUIDE_FINETUNE_EPOCHS = 20, 10
FASTAI_FREEZE_EPOCHS, FASTAI_EPOCHS = 1, 10  # transferkit's default budget is 0 + 10


def scored_split(data: Path) -> str:
    return "test" if (data / "test").is_dir() else "val"


def toml_text(options: dict[str, Any]) -> str:
    """`options` as a --config file: plain settings first, then one [table] per dict (e.g.
    optimizer={"ema": 0.98}); JSON's strings, numbers and lists are TOML's too."""
    plain = "".join(f"{k} = {json.dumps(v)}\n" for k, v in options.items()
                    if not isinstance(v, dict))
    tables = "".join(f"[{k}]\n" + "".join(f"{n} = {json.dumps(x)}\n" for n, x in v.items())
                     for k, v in options.items() if isinstance(v, dict))
    return plain + tables


def transferkit_side(data: Path, seed: int, workdir: Path, options: dict[str, Any]
                     ) -> dict[str, Any]:
    """What a user gets: `transferkit finetune DATA --seed S -o RUN` in its own process (an
    in-process run inherits the process's random-op counters and caches from the runs
    before it), with `options` as a --config file."""
    from transferkit.runs.directory import read_record

    run_dir = workdir / f"tk-{data.name}-{seed}"
    command = [sys.executable, "-m", "transferkit", "finetune", str(data), "-o", str(run_dir),
               "--seed", str(seed), "--overwrite"]
    if options:
        config = workdir / f"tk-{data.name}-{seed}.toml"
        config.write_text(toml_text(options))
        command += ["--config", str(config)]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    record = read_record(run_dir)
    score = next(s for s in record.scores if s.split == scored_split(data))
    history = json.loads((run_dir / "history.json").read_text())
    return {"accuracy": score.accuracy, "seconds": seconds, "kept": record.choice.kept,
            "epochs": [[r["stage"], r["epoch"], r.get("val_accuracy"), r.get("val_loss")]
                       for r in history],
            "probe_ready": record.probe.ready_after if record.probe else None,
            "val_correct": record.choice.val_correct,
            "variant": next(({"name": c.name, "val_correct": c.val_correct, "won": c.won,
                              "seconds": c.seconds}
                             for c in record.candidates if c.kind == "variant"), None),
            "adaptation": None if record.adaptation is None else {
                "pixels": record.adaptation.pixel_accuracy,
                "probe": record.adaptation.probe_accuracy,
                "mirrored": record.adaptation.mirrored_accuracy,
                "deep": record.adaptation.deep,
                "no_flips": record.adaptation.mirror_changes_labels,
                "seconds": record.adaptation.seconds},
            "ece_before": record.calibration.test_ece_before or record.calibration.val_ece_before,
            "ece_after": record.calibration.test_ece_after or record.calibration.val_ece_after}


def probe_side(data: Path, seed: int, workdir: Path) -> dict[str, Any]:
    from transferkit.commands.extract import extract
    from transferkit.config import DataConfig, ExtractConfig
    from transferkit.feature_files import load_features
    from transferkit.training.probe import fit_probe

    start = time.perf_counter()
    result = extract(ExtractConfig(data=DataConfig(data_dir=data, seed=seed), cache=False,
                                   output=workdir / f"probe-{data.name}-{seed}.npz"))
    features = load_features(result.features_path)
    x, y = features.split("train")
    probe = fit_probe(x, y, len(features.class_names), seed=seed)
    x_eval, y_eval = features.split(scored_split(data))
    accuracy = float((probe.probabilities(x_eval).argmax(axis=1) == y_eval).mean())
    return {"accuracy": accuracy, "seconds": time.perf_counter() - start, "c": probe.c}


def keras_guide_side(data: Path, seed: int, epochs: tuple[int, int]) -> dict[str, Any]:
    import keras

    from transferkit.bases import BASES, build_base

    start = time.perf_counter()
    keras.utils.set_random_seed(seed)
    size = (224, 224)

    def images(split: str, shuffle: bool) -> Any:
        return keras.utils.image_dataset_from_directory(
            data / split, image_size=size, batch_size=32, seed=seed, shuffle=shuffle,
            verbose=False)

    train_ds, val_ds = images("train", True), images("val", False)
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
    outputs = keras.layers.Dense(len(train_ds.class_names), activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    head_epochs, finetune_epochs = epochs
    model.fit(train_ds, epochs=head_epochs, validation_data=val_ds, verbose=0)
    base.trainable = True
    model.compile(optimizer=keras.optimizers.Adam(1e-5),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(train_ds, epochs=head_epochs + finetune_epochs, initial_epoch=head_epochs,
              validation_data=val_ds, verbose=0)
    scored = images(scored_split(data), False)
    return {"accuracy": float(model.evaluate(scored, verbose=0)[1]),
            "seconds": time.perf_counter() - start, "epochs": list(epochs)}


def fastai_side(data: Path, seed: int) -> dict[str, Any]:
    from fastai.vision.all import (
        ImageDataLoaders,
        Normalize,
        Resize,
        accuracy,
        aug_transforms,
        default_split,
        get_image_files,
        model_meta,
        set_seed,
        vision_learner,
    )
    from lite0_torch import LITE0_MEAN, LITE0_STD, lite0_imagenet
    from torch import nn

    start = time.perf_counter()
    set_seed(seed, reproducible=True)
    dls = ImageDataLoaders.from_folder(
        data, train="train", valid="val", item_tfms=Resize(224), bs=32, seed=seed,
        num_workers=0, batch_tfms=[*aug_transforms(), Normalize.from_stats(LITE0_MEAN, LITE0_STD)])

    def lite0(pretrained: bool) -> nn.Module:
        return lite0_imagenet()

    # How fastai's vision_learner cuts and splits an arch it does not know: the whole body.
    model_meta[lite0] = {"cut": nn.Sequential, "split": default_split}
    learn = vision_learner(dls, lite0, normalize=False, metrics=accuracy)
    with learn.no_bar(), learn.no_logging():
        learn.fine_tune(FASTAI_EPOCHS, freeze_epochs=FASTAI_FREEZE_EPOCHS)
        scored = dls.test_dl(get_image_files(data / scored_split(data)), with_labels=True)
        probabilities, targets = learn.get_preds(dl=scored)
    return {"accuracy": float((probabilities.argmax(dim=1) == targets).float().mean()),
            "seconds": time.perf_counter() - start}


def summary(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("/tmp/tk-data"))
    parser.add_argument("--sets", nargs="+", default=["tuxpaint10", "tuxpaint", "photos"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--sides", nargs="+", default=["transferkit", "probe", "keras_guide"],
                        choices=["transferkit", "probe", "keras_guide", "fastai"])
    parser.add_argument("--tk-option", action="append", default=[], metavar="NAME=JSON",
                        help="a FinetuneConfig setting for the transferkit side, e.g. "
                             "unfreeze_blocks=4 (repeatable)")
    parser.add_argument("--guide-epochs", nargs=2, type=int, metavar=("HEAD", "FINETUNE"),
                        default=[GUIDE_EPOCHS, GUIDE_FINETUNE_EPOCHS],
                        help="the Keras guide's two budgets (default: its own 20 10; "
                             "transferkit's default budget is 0 10)")
    parser.add_argument("--results", type=Path, default=None, help="append JSON lines here")
    args = parser.parse_args()
    options = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.tk_option)}
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets:
            data = args.data / name
            for seed in args.seeds:
                for side in args.sides:
                    if side == "transferkit":
                        row = transferkit_side(data, seed, Path(tmp), options)
                    elif side == "probe":
                        row = probe_side(data, seed, Path(tmp))
                    elif side == "keras_guide":
                        row = keras_guide_side(data, seed, tuple(args.guide_epochs))
                    else:
                        row = fastai_side(data, seed)
                    row |= {"set": name, "seed": seed, "side": side,
                            "split": scored_split(data), "options": options}
                    rows.setdefault((name, side), []).append(row)
                    print(json.dumps(row), flush=True)
                    if args.results:
                        with args.results.open("a") as f:
                            f.write(json.dumps(row) + "\n")
    print("\n| set (scored split) | side | accuracy, mean ± sd | per seed | mean seconds |")
    print("|---|---|---|---|---|")
    for (name, side), found in rows.items():
        accuracies = [r["accuracy"] for r in found]
        print(f"| {name} ({found[0]['split']}) | {side} | {summary(accuracies)} | "
              f"{'/'.join(f'{a:.3f}' for a in accuracies)} | "
              f"{statistics.mean(r['seconds'] for r in found):.0f} |")


if __name__ == "__main__":
    main()
