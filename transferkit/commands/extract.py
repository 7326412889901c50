"""Feature extraction: the frozen base (or its first N blocks) run once over every image,
and the fast path of training a dense classifier on the saved features."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import keras
import numpy as np

from transferkit.bases import get_base, resolve_image_size
from transferkit.config import ExtractConfig, HeadConfig, OptimizerConfig, ScheduleConfig
from transferkit.data.folders import DataSplits, ImageSet, load_splits
from transferkit.devices import resolve_precision
from transferkit.errors import DataError
from transferkit.feature_files import FeatureSet, ShardWriter, load_features, save_features
from transferkit.features import FeatureExtractor, FeatureModel
from transferkit.metrics import classification_metrics
from transferkit.model import (
    build_classifier,
    build_head,
    find_base,
)
from transferkit.reporting import NullReporter, Reporter
from transferkit.reports.run import Evaluated, write_run_report
from transferkit.runs.directory import (
    check_output,
    check_run_output,
    run_lock,
    save_run,
    save_splits,
)
from transferkit.runs.records import Compute, RunRecord, Score
from transferkit.training.plan import HEAD
from transferkit.training.prepare import data_summary, report_data
from transferkit.training.stages import StageInputs, StagePlan, run_stage, stage_result


@dataclass(frozen=True)
class ExtractResult:
    features_path: Path
    counts: dict[str, int]  # images per split
    width: int  # features per image
    shards: int = 1  # files written (a sharded folder has more)
    run_dir: Path | None = None
    record: RunRecord | None = None  # of the --train-head run
    computed: int = 0  # images that went through the base
    reused: int = 0  # images whose features came from the cache


def train_head(features: FeatureSet, extractor: keras.Model, config: HeadConfig,
               batch_size: int, record: RunRecord, reporter: Reporter
               ) -> tuple[RunRecord, keras.Model]:
    """Trains a dense classifier on saved features; saves it with `extractor` as a run.
    Returns the run's record and the trained head."""
    x_train, y_train = features.split("train")
    x_val, y_val = features.split("val")
    if len(x_val) == 0:
        raise DataError("The feature file has no validation images to train a head against.")
    head = build_head(x_train.shape[1], len(features.class_names), config.dense_units,
                      config.dropout, config.l2, config.init)
    history: list[dict] = []
    plan = StagePlan(HEAD, "train a dense classifier on the extracted features", 0,
                     config.epochs, config.learning_rate, ScheduleConfig(name="constant"))
    trainable = run_stage(StageInputs(
        head, plan, (x_train, y_train), (x_val, y_val), math.ceil(len(x_train) / batch_size),
        history, optimizer=OptimizerConfig(), batch_size=batch_size,
        callbacks=[keras.callbacks.EarlyStopping("val_loss", patience=config.patience,
                                                 restore_best_weights=True)]), reporter)
    stage = stage_result(plan, history, "val_loss", trainable)
    scores = [Score.of("val", round(stage.metrics["val_accuracy"] * len(y_val)), len(y_val),
                       chose=True)]
    x_test, y_test = features.split("test")
    if len(x_test):  # nothing is chosen on the test split; it is scored once, here
        correct = int((head.predict(x_test, verbose=0).argmax(axis=1) == y_test).sum())
        scores.append(Score.of("test", correct, len(y_test), chose=False))
    record = save_run(config.output, build_classifier(extractor, head), record.replace(
        stages=(stage,), kept_stage=HEAD, metrics=stage.metrics, scores=tuple(scores),
        trainable_params={HEAD: trainable}), history)
    reporter.info(f"Saved the run to '{config.output}'.")
    return record, head


def extract(config: ExtractConfig, reporter: Reporter | None = None) -> ExtractResult:
    """Extracts features for every split of `config.data` and saves them (and a head run).

    Features already in the cache for unchanged images are reused; the base is only built
    when some image still needs it.

    Args:
        config: the data folder, base, cut point, output, and --train-head's settings.
        reporter: where progress goes (none when None).

    Returns:
        The counts written (and the head's run, when trained).

    Raises:
        TransferkitError: bad data, options, weights, or an existing output.
    """
    reporter = reporter or NullReporter()
    if config.head is None:
        return _extract(config, reporter)
    with run_lock(config.head.output):
        return _extract(config, reporter)


def _extract(config: ExtractConfig, reporter: Reporter) -> ExtractResult:
    spec = get_base(config.base)
    image_size = resolve_image_size(spec, config.data.image_size)
    blocks = config.blocks or len(spec.blocks)
    spec.check_block_count(blocks, "--blocks")
    check_output(config.output, config.overwrite, config.output_kind,
                 data=config.data.data_dir)
    if config.head is not None:
        check_run_output(config.head.output, config.head.overwrite, config.data.data_dir,
                         "extract")
    splits = load_splits(config.data.data_dir, config.data.val_split, config.data.seed, reporter,
                         use_cache=config.cache)
    report_data(splits, reporter)
    precision = resolve_precision(config.precision)
    job = FeatureModel(spec.name, config.weights, config.data.seed, image_size, precision,
                       blocks, config.pooling, config.data.batch_size)
    extractor = FeatureExtractor.of_model(job, reporter, config.cache, config.engine)
    meta = {"base": spec.name, "weights": config.weights, "image_size": image_size,
            "blocks": blocks, "pooling": config.pooling, "precision": precision,
            "preprocessing": spec.preprocessing.to_dict(),
            "data_dir": str(config.data.data_dir),
            "skipped": [{"path": str(f.path), "reason": f.reason} for f in splits.skipped]}
    width, shards = _write_features(config, splits, extractor, meta, reporter)
    extractor.save()
    reporter.info(f"{spec.name} up to block '{spec.blocks[blocks - 1]}' ({blocks} of "
                  f"{len(spec.blocks)}), {config.pooling} pooling: {width} features per image; "
                  f"{extractor.computed} computed, {extractor.reused} reused from the cache.")
    counts = {name: len(images) for name, images in splits.items()}
    reporter.info(f"Saved {sum(counts.values())} feature vectors to '{config.output}'"
                  + (f" in {shards} shards." if config.shard_rows else "."))
    result = ExtractResult(config.output, counts, width, shards, computed=extractor.computed,
                           reused=extractor.reused)
    if config.head is None:
        return result
    record = _train_head_run(config, load_features(config.output), splits, extractor.model,
                             image_size, precision, reporter)
    return replace(result, run_dir=config.head.output, record=record)


def _write_features(config: ExtractConfig, splits: DataSplits, extractor: FeatureExtractor,
                    meta: dict[str, Any], reporter: Reporter) -> tuple[int, int]:
    """Every image's features, train then val then test, to config.output: one file, or
    --shard-rows images at a time to a shard folder. Returns the feature width and the number
    of files."""
    every = splits.every_image()
    names = np.array([name for name, images in splits.items() for _ in range(len(images))])

    def computed(images: ImageSet, where: np.ndarray, label: str) -> FeatureSet:
        (rows,) = extractor.features([images], label)
        return FeatureSet(rows, images.labels, where,
                          np.array([p.as_posix() for p in images.paths]), splits.class_names,
                          meta)

    if not config.shard_rows:
        found = computed(every, names, "/".join(name for name, _ in splits.items()))
        save_features(config.output, found)
        return found.features.shape[1], 1
    writer = ShardWriter(config.output, extractor.spec.key())
    step, index, width = config.shard_rows, np.arange(len(every)), 0
    starts = range(0, len(every), step)
    for number, start in enumerate(starts, start=1):
        part, where = every.subset((index >= start) & (index < start + step)), \
            names[start:start + step]
        digest = writer.digest(part.hashes, where)
        found = writer.done(digest)
        if found is None:
            found = computed(part, where, f"shard {number} of {len(starts)}'s")
            writer.write(found, digest)
        else:
            reporter.info(f"Shard {number} of {len(starts)}: kept from the stopped run.")
        width = found.features.shape[1]
    writer.finish(meta, splits.class_names)
    return width, len(writer.shards)


def _train_head_run(config: ExtractConfig, features: FeatureSet, splits: DataSplits,
                    extractor: keras.Model, image_size: int, precision: str,
                    reporter: Reporter) -> RunRecord:
    """extract --train-head: the head on the features, saved as a run with its report."""
    assert config.head is not None  # the caller checked
    record, head = train_head(features, extractor, config.head, config.data.batch_size,
                              _head_record(config, image_size, splits, precision,
                                           find_base(extractor).name), reporter)
    save_splits(config.head.output, splits.rows())
    evaluated = []
    for name, images in splits.items()[1:]:  # val, and test when there is one
        x, y = features.split(name)
        probabilities = head.predict(x, verbose=0)
        evaluated.append(Evaluated(name, images, probabilities, classification_metrics(
            y, probabilities, splits.class_names, split=name, chose=name == "val")))
    write_run_report(config.head.output, record, evaluated,
                     (features.features, splits.every_image()))
    return record


def _head_record(config: ExtractConfig, image_size: int, splits: DataSplits, precision: str,
                 base_layer: str) -> RunRecord:
    """The record of an `extract --train-head` run, before its head is trained."""
    spec = get_base(config.base)
    return RunRecord(command="extract", config=config, base=spec.name, base_layer=base_layer,
                     preprocessing=spec.preprocessing, class_names=splits.class_names,
                     image_size=image_size, compute=Compute(precision=precision),
                     data=data_summary(splits))
