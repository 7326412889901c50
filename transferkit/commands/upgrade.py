"""Runs of earlier run formats, brought up to date in place by `upgrade_run`:
- format 1 (transferkit 0.1): model.keras holds 0.1's own preprocessing layer, so it needs
  that class to load; it is re-saved as a plain Keras model, checked to predict the same.
- format 2: run.json kept the resolved config (image size, depth, rates, flips written
  into it) and the class weights beside it; format 3 keeps the config apart from the
  decided image size and Plan. Format 2's resolved config becomes the config, and its
  values the Plan (they are what the run trained with).
- format 3 is read as it is (its three candidate fields become format 4's list, in
  `RunRecord.from_dict`); `upgrade` writes it as format 4.
Nothing else reads formats 1 and 2; `runs.directory.read_record` points here.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import ops

from transferkit.bases import get_base
from transferkit.config import FinetuneConfig, from_dict, to_dict
from transferkit.errors import ArtifactError, ConfigError
from transferkit.model import build_classifier, build_feature_extractor, find_base
from transferkit.runs.directory import (
    MODEL_FILE,
    RECORD_FILE,
    read_json,
    run_lock,
    save_model,
    save_record,
)
from transferkit.runs.records import COMMANDS, RunRecord
from transferkit.training.plan import build_plan


@keras.saving.register_keras_serializable(package="transferkit", name="ImagePreprocessing")
class LegacyImagePreprocessing(keras.layers.Layer):
    """transferkit 0.1's input scaling layer, under the name its files use, so that they load
    (in safe mode: this class is code of ours, not of the file). It is never saved again."""

    def __init__(self, channel_order: str = "rgb", mean: Sequence[float] = (0.0, 0.0, 0.0),
                 std: Sequence[float] = (1.0, 1.0, 1.0), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.channel_order = channel_order
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def call(self, inputs: Any) -> Any:
        x = ops.cast(inputs, self.compute_dtype)
        if self.channel_order == "bgr":
            x = ops.flip(x, axis=-1)
        return (x - ops.convert_to_tensor(self.mean, self.compute_dtype)) / \
            ops.convert_to_tensor(self.std, self.compute_dtype)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "channel_order": self.channel_order,
                "mean": list(self.mean), "std": list(self.std)}


def _plan_of(values: dict[str, Any], config: Any, class_weights: Any) -> dict[str, Any] | None:
    """The Plan a run of an earlier format trained with: its resolved config, read as if the
    user had given those values (so the plan decides nothing more)."""
    command = values.get("command")
    if command not in ("finetune", "cv") or not isinstance(config, dict):
        return None
    resolved = from_dict(COMMANDS[command], config, prefix="config.")
    assert isinstance(resolved, FinetuneConfig)  # the command says so
    return to_dict(build_plan(resolved, get_base(str(values.get("base"))),
                              class_weights=class_weights))


def record_from_v1(values: dict[str, Any]) -> RunRecord:
    """A current record from a format-1 run.json (validated as any record is).

    Raises:
        ConfigError: a field is missing or invalid.
    """
    known = {"command", "base", "base_layer", "preprocessing", "class_names", "image_size",
             "compute", "data", "status", "trainable_params", "stages", "kept_stage",
             "metrics", "stopped", "versions", "updated"}
    config = dict(values.get("config") or {})
    config["data"] = {**dict(config.get("data") or {}), "image_size": values.get("image_size")}
    record: dict[str, Any] = {k: v for k, v in values.items() if k in known}
    record |= {"config": config, "plan": _plan_of(values, config, values.get("class_weight"))}
    if values.get("command") == "extract":  # 0.1 kept these beside the config
        record |= {"compute": {"precision": values.get("precision", "float32")},
                   "base_layer": values.get("base_layer", ""), "kept_stage": "head"}
    found = values.get("lr_find")
    if isinstance(found, dict):
        losses = list(found.get("losses") or [])
        record["lr_find"] = {**found, "rule": "a tenth of the rate at the lowest loss (0.1)",
                             "at_edge": bool(losses) and
                             int(np.argmin(losses)) >= len(losses) - max(2, len(losses) // 20)}
    return RunRecord.from_dict(record)


def record_from_v2(values: dict[str, Any]) -> RunRecord:
    """A current record from a format-2 run.json: the image size and Plan out of its
    resolved config.

    Raises:
        ConfigError: a field is missing or invalid.
    """
    record = {k: v for k, v in values.items() if k not in ("format", "format_version")}
    config = record.get("config")
    data = config.get("data") if isinstance(config, dict) else None
    record["image_size"] = data.get("image_size") if isinstance(data, dict) else None
    record["plan"] = _plan_of(record, config, record.pop("class_weights", None))
    return RunRecord.from_dict(record)


def upgrade_run(run_dir: Path) -> int:
    """Brings a run of an earlier format up to the current one, in place (format 1: the same
    base and head re-saved behind Keras's own preprocessing layers, checked to give the same
    probabilities first). Returns the format it had.

    Args:
        run_dir: the run to bring up to date, in place.

    Raises:
        ArtifactError: `run_dir` is not a run of an earlier format, or cannot be converted.
    """
    with run_lock(run_dir):
        values = read_json(run_dir / RECORD_FILE)
        version = values.get("format_version") if isinstance(values, dict) else None
        if version not in (1, 2, 3):
            raise ArtifactError(f"'{run_dir}' is not a run of an earlier format (run format "
                                f"1, 2 or 3); there is nothing to upgrade.")
        try:
            record = (record_from_v1(values) if version == 1 else record_from_v2(values)
                      if version == 2 else RunRecord.from_dict(values, 3))
        except ConfigError as exc:
            raise ArtifactError(f"'{run_dir / RECORD_FILE}' is damaged: "
                                f"{str(exc).rstrip('.')}.") from exc
        if version == 1:
            record = record.replace(base_layer=_resave_v1_model(run_dir, record))
        save_record(run_dir, record)
        return version


def _resave_v1_model(run_dir: Path, record: RunRecord) -> str:
    """Re-saves a format-1 model.keras as plain Keras; returns its base layer's name."""
    try:
        old = keras.saving.load_model(run_dir / MODEL_FILE, compile=False, safe_mode=True)
    except (OSError, ValueError, TypeError, KeyError, zipfile.BadZipFile) as exc:
        raise ArtifactError(f"Could not load '{run_dir / MODEL_FILE}' ({exc}).") from exc
    features = old.get_layer("features")
    base = find_base(features)
    pooling = ("max" if isinstance(features.get_layer("pooling"),
                                   keras.layers.GlobalMaxPooling2D) else "avg")
    model = build_classifier(build_feature_extractor(base, record.preprocessing, pooling),
                             old.get_layer("head"))
    images = np.random.default_rng(0).uniform(
        0, 255, (4, record.image_size, record.image_size, 3)).astype("float32")
    difference = float(np.abs(old.predict(images, verbose=0)
                              - model.predict(images, verbose=0)).max())
    if difference > 1e-4:
        raise ArtifactError(f"The re-saved model of '{run_dir}' would differ from the old "
                            f"one by {difference:.2g}; nothing was changed.")
    save_model(run_dir / MODEL_FILE, model)
    return base.name
