"""Getting a finetune ready: the data read and split, the classifier built under the precision
policy and inside the distribution strategy, and what the run records about its data."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from transferkit.bases import BaseSpec, build_base, resolve_image_size
from transferkit.config import FinetuneConfig
from transferkit.data.folders import DataSplits, load_splits
from transferkit.devices import build_strategy, precision_policy
from transferkit.errors import MissingPackageError
from transferkit.model import build_classifier, build_feature_extractor, build_head
from transferkit.reporting import Reporter
from transferkit.runs.directory import check_run_output
from transferkit.runs.records import DataSummary, SkippedRecord


def data_summary(splits: DataSplits) -> DataSummary:
    """What run.json records about the data a run saw."""
    return DataSummary(
        presplit=splits.presplit,
        counts={name: {c: int(np.sum(s.labels == i)) for i, c in enumerate(s.class_names)}
                for name, s in splits.items()},
        converted=sum(s.converted for _, s in splits.items()),
        skipped=tuple(SkippedRecord(path=str(f.path), reason=f.reason) for f in splits.skipped))


def report_data(splits: DataSplits, reporter: Reporter) -> None:
    """Says what will be trained on, and lists every file left out, so nothing is dropped
    silently."""
    if splits.skipped:
        shown = "\n".join(f"  {f.path}: {f.reason}" for f in splits.skipped[:20])
        more = len(splits.skipped) - 20
        reporter.warning(f"Skipped {len(splits.skipped)} file(s):\n{shown}"
                         + (f"\n  ... and {more} more (all listed in run.json)" if more > 0
                            else ""))
    converted = sum(s.converted for _, s in splits.items())
    if converted:
        reporter.info(f"{converted} image(s) (EXIF-rotated, with alpha, CMYK, 16-bit or TIFF) "
                      f"are read through a plain RGB copy made once.")
    counts = ", ".join(f"{len(s)} {name}" for name, s in splits.items())
    reporter.info(f"{counts} images in {len(splits.class_names)} classes: "
                  f"{', '.join(splits.class_names)}")


@dataclass(frozen=True)
class Prepared:
    """Data and model ready to train."""

    spec: BaseSpec
    image_size: int
    splits: DataSplits
    base: keras.Model
    extractor: keras.Model
    model: keras.Model
    strategy: Any  # tf.distribute.Strategy the model lives in
    precision: str  # resolved: float32 | mixed


def prepare(config: FinetuneConfig, spec: BaseSpec, reporter: Reporter,
            splits: DataSplits | None = None, output: Path | None = None) -> Prepared:
    """Checks the options against base `spec` and the run directory `output` (when one is
    written), reads the data (unless given its `splits`) and builds the classifier (seeded)
    under the precision policy and inside the distribution strategy."""
    image_size = resolve_image_size(spec, config.data.image_size)
    if config.tunes:
        spec.check_block_count(config.unfreeze_blocks, "--unfreeze-blocks")
    if config.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise MissingPackageError.needs("--tensorboard", ["tensorboard"], "tensorboard",
                                        " (or drop --tensorboard).")
    if output is not None:
        check_run_output(output, config.overwrite, config.data.data_dir, "finetune")
    if splits is None:
        splits = load_splits(config.data.data_dir, config.data.val_split, config.data.seed,
                             reporter)
    report_data(splits, reporter)
    strategy = build_strategy(config.compute.strategy)
    keras.utils.set_random_seed(config.data.seed)
    with precision_policy(config.compute.precision) as precision, strategy.scope():
        base = build_base(spec, image_size, config.weights)
        extractor = build_feature_extractor(base, spec.preprocessing)
        head = build_head(extractor.output_shape[-1], len(splits.class_names),
                          config.dense_units, config.dropout, config.l2, config.init)
        model = build_classifier(extractor, head)
    return Prepared(spec, image_size, splits, base, extractor, model, strategy, precision)
