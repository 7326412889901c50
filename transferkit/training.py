"""Training stages and the staged `finetune`: a new head on the frozen base first (so large
random-head gradients never reach pretrained weights), then the top blocks at a lower rate.

Every completed epoch is checkpointed with its optimizer state; SIGINT/SIGTERM stop training
at the next batch boundary, and `resume_finetune` carries on from the last checkpoint in the
right stage, with the right frozen layers, optimizer state, learning rate and epoch.
"""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import keras
import numpy as np

from transferkit.artifacts import (
    INTERRUPTED,
    RUNNING,
    check_new_output,
    clear_run,
    load_checkpoint,
    read_run_info,
    read_splits,
    save_checkpoint,
    save_run,
    save_run_info,
    save_splits,
)
from transferkit.augment import build_augmentation
from transferkit.bases import BaseSpec, build_base, get_base, resolve_image_size
from transferkit.callbacks import EpochReporter
from transferkit.config import FinetuneConfig, from_dict, to_dict
from transferkit.data import DataSplits, build_dataset, load_splits, splits_from_table
from transferkit.errors import ArtifactError, RunInterrupted
from transferkit.freezing import (
    check_unfreeze_blocks,
    count_params,
    freeze_base,
    unfreeze_top_blocks,
)
from transferkit.model import build_classifier, build_feature_extractor, build_head
from transferkit.reporting import NullReporter, Reporter, StageInfo

HEAD, FINETUNE = "head", "finetune"


@dataclass(frozen=True)
class StageResult:
    """What one stage did and how it ended."""

    name: str
    epochs: int
    learning_rate: float
    trainable_params: int
    metrics: dict[str, float]  # last epoch's
    best_val_accuracy: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "epochs": self.epochs, "learning_rate": self.learning_rate,
                "trainable_params": self.trainable_params, "metrics": self.metrics,
                "best_val_accuracy": self.best_val_accuracy}


def best_val_accuracy(rows: Sequence[dict[str, Any]]) -> float | None:
    scores = [row["val_accuracy"] for row in rows if "val_accuracy" in row]
    return max(scores) if scores else None


def run_stage(model: keras.Model, name: str, description: str, train: Any, validation: Any,
              learning_rate: float, reporter: Reporter, steps: int, history: list[dict],
              first_epoch: int, last_epoch: int, compile: bool = True,
              callbacks: Sequence[keras.callbacks.Callback] = (),
              batch_size: int | None = None) -> StageResult:
    """Trains `model` from `first_epoch` to `last_epoch` (global epoch numbers).

    With `compile`, the model is compiled for its current `trainable` state first; without,
    it keeps the optimizer it has (a resumed stage). Epoch rows are appended to `history`.
    `train` and `validation` are datasets, or (x, y) arrays with `batch_size`.
    """
    if compile:
        model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    counts = count_params(model)
    reporter.stage_started(StageInfo(name, description, last_epoch - first_epoch, learning_rate,
                                     counts.trainable, counts.non_trainable))
    recorder = EpochReporter(reporter, name, last_epoch, steps, history)
    # A dataset arrives shuffled already; arrays are shuffled by fit.
    fit_args: dict[str, Any] = {"x": train, "validation_data": validation, "shuffle": False}
    if isinstance(train, tuple):
        fit_args = {"x": train[0], "y": train[1], "validation_data": validation,
                    "batch_size": batch_size}
    model.fit(**fit_args, epochs=last_epoch, initial_epoch=first_epoch, verbose=0,
              callbacks=[recorder, *callbacks])
    rows = [row for row in history if row["stage"] == name]
    last = {k: v for k, v in rows[-1].items() if k not in ("stage", "epoch")}
    return StageResult(name, len(rows), learning_rate, counts.trainable, last,
                       best_val_accuracy(rows))


def data_summary(splits: DataSplits) -> dict[str, Any]:
    """What run.json records about the data a run saw."""
    return {
        "presplit": splits.presplit,
        "counts": {name: {c: int(np.sum(s.labels == i)) for i, c in enumerate(s.class_names)}
                   for name, s in splits.items()},
        "converted": sum(s.converted for _, s in splits.items()),
        "skipped": [{"path": str(f.path), "reason": f.reason} for f in splits.skipped],
    }


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


def split_rows(splits: DataSplits) -> list[tuple[str, str, str]]:
    """splits.csv rows: relative path, class name, split."""
    return [(p.as_posix(), s.class_names[label], name) for name, s in splits.items()
            for p, label in zip(s.paths, s.labels, strict=True)]


class StopOnSignal:
    """While active, SIGINT and SIGTERM ask training to stop at the next batch boundary
    instead of killing it mid-write. A second Ctrl-C interrupts at once."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._request)
        return self

    def _request(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.reporter.warning(f"{signal.Signals(signum).name} received: stopping at the end of "
                              f"the current batch (Ctrl-C again to abort at once).")

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def check(self, *args: Any, **kwargs: Any) -> None:
        """Raises _Stop when a stop was requested (used as a callback at every boundary)."""
        if self.signum is not None:
            raise _Stop(self.signum)

    def callback(self) -> keras.callbacks.Callback:
        return keras.callbacks.LambdaCallback(on_train_batch_end=self.check,
                                              on_test_batch_end=self.check,
                                              on_epoch_end=self.check)


class _Stop(Exception):
    """Raised inside fit() to leave it at a batch boundary."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@dataclass(frozen=True)
class FinetuneResult:
    run_dir: Path
    class_names: tuple[str, ...]
    stages: tuple[StageResult, ...]


@dataclass(frozen=True)
class _Stage:
    name: str
    description: str
    first_epoch: int
    last_epoch: int
    learning_rate: float


def _plan(config: FinetuneConfig, spec: BaseSpec) -> list[_Stage]:
    stages = [_Stage(HEAD, f"train a new head on the frozen {spec.name} base", 0,
                     config.epochs, config.learning_rate)]
    if config.finetune_epochs:
        top = spec.blocks[-config.unfreeze_blocks:]
        stages.append(_Stage(
            FINETUNE, f"fine-tune block{'s' if len(top) > 1 else ''} {', '.join(top)} "
                      f"(BatchNorm frozen)", config.epochs,
            config.epochs + config.finetune_epochs, config.finetune_lr))
    return stages


def finetune(config: FinetuneConfig, reporter: Reporter | None = None) -> FinetuneResult:
    """Trains a classifier on `config.data` in two stages and writes the run directory.

    Raises:
        TransferkitError: bad data, options, weights, or an existing output (all checked
            before anything is written); RunInterrupted when stopped by a signal.
    """
    reporter = reporter or NullReporter()
    spec = get_base(config.base)
    image_size = resolve_image_size(spec, config.data.image_size)
    if config.finetune_epochs:
        check_unfreeze_blocks(spec, config.unfreeze_blocks)
    check_new_output(config.output, config.overwrite)
    splits = load_splits(config.data.data_dir, config.data.val_split, config.data.seed, reporter)
    report_data(splits, reporter)

    keras.utils.set_random_seed(config.data.seed)
    base = build_base(spec, image_size, config.weights)
    extractor = build_feature_extractor(base, spec.preprocessing)
    head = build_head(extractor.output_shape[-1], len(splits.class_names),
                      dropout=config.dropout)
    model = build_classifier(extractor, head)

    info = {
        "command": "finetune",
        "config": to_dict(config),
        "base": spec.name,
        "base_layer": base.name,
        "weights": config.weights,
        "image_size": image_size,
        "preprocessing": spec.preprocessing.to_dict(),
        "class_names": list(splits.class_names),
        "data": data_summary(splits),
    }
    if config.overwrite:
        clear_run(config.output)
    save_splits(config.output, split_rows(splits))
    save_run_info(config.output, {**info, "status": RUNNING})
    return _train(config, spec, splits, model, base, info, [], 0, reporter)


def resume_finetune(run_dir: Path, reporter: Reporter | None = None) -> FinetuneResult:
    """Continues an interrupted `finetune` from its last completed epoch.

    Raises:
        ArtifactError: `run_dir` is not an unfinished run, or has no checkpoint yet.
    """
    reporter = reporter or NullReporter()
    info = read_run_info(run_dir, finished=False)
    if info.get("command") != "finetune" or info.get("status") not in (RUNNING, INTERRUPTED):
        raise ArtifactError(f"'{run_dir}' is not an unfinished finetune run (status "
                            f"{info.get('status')!r}); there is nothing to resume.")
    config = from_dict(FinetuneConfig, {**info["config"], "output": str(run_dir)})
    spec = get_base(config.base)
    model, state = load_checkpoint(run_dir)
    splits = splits_from_table(Path(config.data.data_dir), info["class_names"],
                               read_splits(run_dir), reporter)
    report_data(splits, reporter)
    reporter.info(f"Resuming stage '{state['stage']}' after epoch {state['epoch']}.")
    keras.utils.set_random_seed(config.data.seed + int(state["epoch"]))
    base = model.get_layer("features").get_layer(info["base_layer"])
    return _train(config, spec, splits, model, base, info, list(state["history"]),
                  int(state["epoch"]), reporter, resumed_stage=state["stage"])


def _finished_stage(stage: _Stage, history: list[dict], info: dict[str, Any]) -> StageResult:
    """The result of a stage that completed before the run was interrupted."""
    rows = [r for r in history if r["stage"] == stage.name]
    return StageResult(stage.name, len(rows), stage.learning_rate,
                       int(info["trainable_params"][stage.name]),
                       {k: v for k, v in rows[-1].items() if k not in ("stage", "epoch")},
                       best_val_accuracy(rows))


def _train(config: FinetuneConfig, spec: BaseSpec, splits: DataSplits, model: keras.Model,
           base: keras.Model, info: dict[str, Any], history: list[dict], done: int,
           reporter: Reporter, resumed_stage: str | None = None) -> FinetuneResult:
    """Runs the stages not finished yet, checkpointing each epoch; writes the run at the end."""
    run_dir, batch = config.output, config.data.batch_size
    image_size = int(info["image_size"])
    train_ds = build_dataset(splits.train.sources, splits.train.labels, image_size, batch,
                             shuffle_seed=config.data.seed + done,
                             augment=build_augmentation(config.augment, config.data.seed))
    val_ds = build_dataset(splits.val.sources, splits.val.labels, image_size, batch)
    steps = math.ceil(len(splits.train) / batch)
    results = []
    with StopOnSignal(reporter) as stop:
        for stage in _plan(config, spec):
            if done >= stage.last_epoch:  # finished before an interruption
                results.append(_finished_stage(stage, history, info))
                continue
            resuming = resumed_stage == stage.name and done > stage.first_epoch
            if not resuming:
                if stage.name == HEAD:
                    freeze_base(base)
                else:
                    unfreeze_top_blocks(base, spec, config.unfreeze_blocks)
                info.setdefault("trainable_params", {})[stage.name] = \
                    count_params(model).trainable
                save_run_info(run_dir, {**info, "status": RUNNING})

            def checkpoint(epoch: int, logs: dict | None, name: str = stage.name) -> None:
                rows = [r for r in history if r["stage"] == name]
                improved = (logs or {}).get("val_accuracy", -1.0) >= (
                    best_val_accuracy(rows[:-1]) or -1.0)
                save_checkpoint(run_dir, model, {"stage": name, "epoch": epoch + 1,
                                                 "history": history},
                                best_of_stage=name if improved else None)

            try:
                result = run_stage(
                    model, stage.name, stage.description, train_ds, val_ds,
                    stage.learning_rate, reporter, steps, history,
                    first_epoch=done if resuming else stage.first_epoch,
                    last_epoch=stage.last_epoch, compile=not resuming,
                    callbacks=[keras.callbacks.LambdaCallback(on_epoch_end=checkpoint),
                               stop.callback()])
            except _Stop as stopped:
                name = signal.Signals(stopped.signum).name
                if not history:
                    save_run_info(run_dir, {**info, "status": INTERRUPTED})
                    raise RunInterrupted(
                        f"Stopped by {name} before the first epoch ended; there is no "
                        f"checkpoint to resume. Start again with --overwrite.",
                        stopped.signum) from None
                where = {"stage": history[-1]["stage"], "epoch": history[-1]["epoch"],
                         "signal": name}
                save_run_info(run_dir, {**info, "status": INTERRUPTED, "stopped": where})
                raise RunInterrupted(
                    f"Stopped by {name}. '{run_dir}' keeps its checkpoint from epoch "
                    f"{where['epoch']} (stage {where['stage']}). Continue with: "
                    f"transferkit finetune --resume {run_dir}", stopped.signum) from None
            results.append(result)
            done = stage.last_epoch
    info = {**info, "stages": [s.to_dict() for s in results], "metrics": results[-1].metrics}
    info.pop("stopped", None)
    save_run(run_dir, model, info, history)
    reporter.info(f"Saved the run to '{run_dir}'.")
    return FinetuneResult(run_dir, splits.class_names, tuple(results))
