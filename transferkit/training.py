"""Training stages and the staged `finetune`: a new head on the frozen base first (so large
random-head gradients never reach pretrained weights), then the top blocks at a lower rate."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from transferkit.artifacts import check_new_output, save_run
from transferkit.augment import build_augmentation
from transferkit.bases import build_base, get_base, resolve_image_size
from transferkit.callbacks import EpochReporter
from transferkit.config import FinetuneConfig, to_dict
from transferkit.data import DataSplits, build_dataset, load_splits
from transferkit.freezing import count_params, freeze_base, unfreeze_top_blocks
from transferkit.model import build_classifier, build_feature_extractor, build_head
from transferkit.reporting import NullReporter, Reporter, StageInfo


@dataclass(frozen=True)
class StageResult:
    """What one stage did and how it ended."""

    name: str
    epochs: int
    learning_rate: float
    trainable_params: int
    metrics: dict[str, float]  # last epoch's
    best_val_accuracy: float | None
    history: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "epochs": self.epochs, "learning_rate": self.learning_rate,
                "trainable_params": self.trainable_params, "metrics": self.metrics,
                "best_val_accuracy": self.best_val_accuracy}


def run_stage(model: keras.Model, name: str, description: str, train: Any,
              validation: Any, learning_rate: float, epochs: int, reporter: Reporter,
              steps: int, initial_epoch: int = 0, batch_size: int | None = None) -> StageResult:
    """Compiles `model` for its current `trainable` state and trains it for `epochs` epochs.

    `train` and `validation` are datasets, or (x, y) arrays with `batch_size`.
    """
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    counts = count_params(model)
    reporter.stage_started(StageInfo(name, description, epochs, learning_rate,
                                     counts.trainable, counts.non_trainable))
    recorder = EpochReporter(reporter, name, initial_epoch + epochs, steps)
    # A dataset arrives shuffled already; arrays are shuffled by fit.
    fit_args: dict[str, Any] = {"x": train, "validation_data": validation, "shuffle": False}
    if isinstance(train, tuple):
        fit_args = {"x": train[0], "y": train[1], "validation_data": validation,
                    "batch_size": batch_size}
    model.fit(**fit_args, epochs=initial_epoch + epochs, initial_epoch=initial_epoch,
              verbose=0, callbacks=[recorder])
    val_accuracies = [row["val_accuracy"] for row in recorder.rows if "val_accuracy" in row]
    last = {k: v for k, v in recorder.rows[-1].items() if k not in ("stage", "epoch")}
    return StageResult(name, epochs, learning_rate, counts.trainable, last,
                       max(val_accuracies) if val_accuracies else None, recorder.rows)


def data_summary(splits: DataSplits) -> dict[str, Any]:
    """What run.json records about the data a run saw."""
    return {
        "presplit": splits.presplit,
        "counts": {name: {c: int(np.sum(s.labels == i)) for i, c in enumerate(s.class_names)}
                   for name, s in splits.items()},
        "skipped": [{"path": str(f.path), "reason": f.reason} for f in splits.skipped],
    }


def report_skipped(splits: DataSplits, reporter: Reporter) -> None:
    """One warning listing the files left out, so nothing is dropped silently."""
    if splits.skipped:
        shown = "\n".join(f"  {f.path}: {f.reason}" for f in splits.skipped[:20])
        more = len(splits.skipped) - 20
        reporter.warning(f"Skipped {len(splits.skipped)} file(s):\n{shown}"
                         + (f"\n  ... and {more} more (listed in run.json)" if more > 0 else ""))


@dataclass(frozen=True)
class FinetuneResult:
    run_dir: Path
    class_names: tuple[str, ...]
    stages: tuple[StageResult, ...]


def finetune(config: FinetuneConfig, reporter: Reporter | None = None) -> FinetuneResult:
    """Trains a classifier on `config.data` in two stages and writes the run directory.

    Raises:
        TransferkitError: bad data, options, weights, or an existing output.
    """
    reporter = reporter or NullReporter()
    spec = get_base(config.base)
    image_size = resolve_image_size(spec, config.data.image_size)
    check_new_output(config.output, config.overwrite)
    splits = load_splits(config.data.data_dir, config.data.val_split, config.data.seed, reporter)
    report_skipped(splits, reporter)
    reporter.info(f"{len(splits.train)} training and {len(splits.val)} validation images in "
                  f"{len(splits.class_names)} classes: {', '.join(splits.class_names)}")

    keras.utils.set_random_seed(config.data.seed)
    base = build_base(spec, image_size, config.weights)
    extractor = build_feature_extractor(base, spec.preprocessing)
    head = build_head(extractor.output_shape[-1], len(splits.class_names),
                      dropout=config.dropout)
    model = build_classifier(extractor, head)

    batch = config.data.batch_size
    train_ds = build_dataset(splits.train.absolute_paths(), splits.train.labels, image_size,
                             batch, shuffle_seed=config.data.seed,
                             augment=build_augmentation(config.augment, config.data.seed))
    val_ds = build_dataset(splits.val.absolute_paths(), splits.val.labels, image_size, batch)
    steps = math.ceil(len(splits.train) / batch)

    freeze_base(base)
    stages = [run_stage(model, "head", f"train a new head on the frozen {spec.name} base",
                        train_ds, val_ds, config.learning_rate, config.epochs, reporter, steps)]
    if config.finetune_epochs:
        top = unfreeze_top_blocks(base, spec, config.unfreeze_blocks)
        stages.append(run_stage(
            model, "finetune", f"fine-tune block{'s' if len(top) > 1 else ''} {', '.join(top)} "
            f"(BatchNorm frozen)", train_ds, val_ds, config.finetune_lr, config.finetune_epochs,
            reporter, steps, initial_epoch=config.epochs))

    info = {
        "command": "finetune",
        "config": to_dict(config),
        "base": spec.name,
        "weights": config.weights,
        "image_size": image_size,
        "preprocessing": spec.preprocessing.to_dict(),
        "class_names": list(splits.class_names),
        "data": data_summary(splits),
        "stages": [s.to_dict() for s in stages],
        "metrics": stages[-1].metrics,
    }
    save_run(config.output, model, info, [row for s in stages for row in s.history])
    reporter.info(f"Saved the run to '{config.output}'.")
    return FinetuneResult(config.output, splits.class_names, tuple(stages))
