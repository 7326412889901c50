"""Feature extraction: the frozen base (or its first N blocks) run once over every image,
and the fast path of training a dense classifier on the saved features."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from transferkit.artifacts import (
    FeatureSet,
    check_new_output,
    save_features,
    save_run,
    save_splits,
)
from transferkit.bases import build_base, get_base, resolve_image_size
from transferkit.config import ExtractConfig, HeadConfig, OptimizerConfig, ScheduleConfig, to_dict
from transferkit.data import load_splits
from transferkit.devices import precision_policy, resolve_precision
from transferkit.errors import DataError
from transferkit.features import FeatureExtractor, FeatureSpec, weights_fingerprint
from transferkit.model import build_classifier, build_feature_extractor, build_head, cut_base
from transferkit.reporting import NullReporter, Reporter
from transferkit.training import (
    HEAD,
    StagePlan,
    StageResult,
    data_summary,
    report_data,
    run_stage,
    split_rows,
    stage_result,
)


@dataclass(frozen=True)
class ExtractResult:
    features_path: Path
    features: FeatureSet
    run_dir: Path | None = None
    stage: StageResult | None = None
    computed: int = 0  # images that went through the base
    reused: int = 0  # images whose features came from the cache


def train_head(features: FeatureSet, extractor: keras.Model, config: HeadConfig,
               info: dict, reporter: Reporter) -> StageResult:
    """Trains a dense classifier on saved features; saves it with `extractor` as a run."""
    x_train, y_train = features.split("train")
    x_val, y_val = features.split("val")
    if len(x_val) == 0:
        raise DataError("The feature file has no validation images to train a head against.")
    head = build_head(x_train.shape[1], len(features.class_names), config.dense_units,
                      config.dropout, config.l2, config.init)
    batch_size = 32
    history: list[dict] = []
    plan = StagePlan(HEAD, "train a dense classifier on the extracted features", 0,
                     config.epochs, config.learning_rate, ScheduleConfig("constant"))
    trainable = run_stage(head, plan, (x_train, y_train), (x_val, y_val), reporter,
                          math.ceil(len(x_train) / batch_size), history,
                          optimizer=OptimizerConfig(), batch_size=batch_size,
                          callbacks=[keras.callbacks.EarlyStopping(
                              "val_loss", patience=config.patience,
                              restore_best_weights=True)])
    stage = stage_result(plan, history, "val_loss", trainable)
    info = {**info, "stages": [stage.to_dict()], "metrics": stage.metrics}
    save_run(config.output, build_classifier(extractor, head), info, history)
    reporter.info(f"Saved the run to '{config.output}'.")
    return stage


def extract(config: ExtractConfig, reporter: Reporter | None = None) -> ExtractResult:
    """Extracts features for every split of `config.data` and saves them (and a head run).

    Features already in the cache for unchanged images are reused; the base is only built
    when some image still needs it.

    Raises:
        TransferkitError: bad data, options, weights, or an existing output.
    """
    reporter = reporter or NullReporter()
    spec = get_base(config.base)
    image_size = resolve_image_size(spec, config.data.image_size)
    blocks = config.blocks or len(spec.blocks)
    spec.check_block_count(blocks, "--blocks")
    check_new_output(config.output, config.overwrite, what="feature file")
    if config.head is not None:
        check_new_output(config.head.output, config.head.overwrite)
    splits = load_splits(config.data.data_dir, config.data.val_split, config.data.seed, reporter,
                         use_cache=config.cache)
    report_data(splits, reporter)
    seed = config.data.seed
    precision = resolve_precision(config.precision)

    def build() -> keras.Model:
        keras.utils.set_random_seed(seed)
        with precision_policy(precision):
            base = cut_base(build_base(spec, image_size, config.weights), spec, blocks)
            return build_feature_extractor(base, spec.preprocessing, config.pooling)

    feature_spec = FeatureSpec(spec.name, weights_fingerprint(spec, config.weights, seed),
                               image_size, blocks, config.pooling, spec.preprocessing.to_dict(),
                               precision)
    extractor = FeatureExtractor(build, feature_spec, config.data.batch_size, reporter,
                                 use_cache=config.cache)
    named = splits.items()
    arrays = extractor.features([s for _, s in named], "/".join(name for name, _ in named))
    parts = [(name, s, f) for (name, s), f in zip(named, arrays, strict=True)]
    extractor.save()
    reporter.info(f"{spec.name} up to block '{spec.blocks[blocks - 1]}' ({blocks} of "
                  f"{len(spec.blocks)}), {config.pooling} pooling: {parts[0][2].shape[1]} "
                  f"features per image; {extractor.computed} computed, {extractor.reused} "
                  f"reused from the cache.")
    meta = {"base": spec.name, "weights": config.weights, "image_size": image_size,
            "blocks": blocks, "pooling": config.pooling, "precision": precision,
            "preprocessing": spec.preprocessing.to_dict(), "data_dir": str(config.data.data_dir),
            "skipped": [{"path": str(f.path), "reason": f.reason} for f in splits.skipped]}
    features = FeatureSet(
        features=np.concatenate([f for _, _, f in parts]),
        labels=np.concatenate([s.labels for _, s, _ in parts]),
        splits=np.array([name for name, s, _ in parts for _ in range(len(s))]),
        paths=np.array([p.as_posix() for _, s, _ in parts for p in s.paths]),
        class_names=splits.class_names,
        meta=meta,
    )
    save_features(config.output, features, config.overwrite)
    reporter.info(f"Saved {len(features.labels)} feature vectors to '{config.output}'.")
    if config.head is None:
        return ExtractResult(config.output, features, computed=extractor.computed,
                             reused=extractor.reused)
    info = {"command": "extract", "config": to_dict(config), **meta,
            "class_names": list(splits.class_names), "data": data_summary(splits)}
    stage = train_head(features, extractor.model, config.head, info, reporter)
    save_splits(config.head.output, split_rows(splits))
    return ExtractResult(config.output, features, config.head.output, stage,
                         extractor.computed, extractor.reused)
