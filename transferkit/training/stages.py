"""One training stage: optimizer, per-epoch learning-rate schedule, class weights, and the
bookkeeping of which epoch was best."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from transferkit.config import OptimizerConfig, ScheduleConfig
from transferkit.inference import val_scores
from transferkit.quiet import native_lines_filtered
from transferkit.reporting import Reporter, StageInfo
from transferkit.runs.records import StageResult
from transferkit.training.callbacks import (
    EpochReporter,
    StopOnNonFinite,
    ValidateByPredicting,
    best_row,
)
from transferkit.training.freezing import count_params
from transferkit.workers import Cluster, fit_across_workers


def _step(base_lr: float, t: int, span: int, rate: float, every: int | None) -> float:
    return base_lr * rate ** (t // (every or max(1, math.ceil(span / 3))))


# name -> (default decay rate, lr(base_lr, epoch t after warm-up, span, rate, decay_epochs))
SCHEDULES: dict[str, tuple[float, Callable[[float, int, int, float, int | None], float]]] = {
    "constant": (1.0, lambda lr, t, span, rate, every: lr),
    "step": (0.5, _step),  # x rate every decay_epochs (default: a third of the stage)
    "exponential": (0.9, lambda lr, t, span, rate, every: lr * rate**t),
    "inverse-time": (0.5, lambda lr, t, span, rate, every: lr / (1 + rate * t)),
    "cosine": (1.0, lambda lr, t, span, rate, every: lr * 0.5 * (1 + math.cos(math.pi * t / span))),
}


def learning_rate_at(schedule: ScheduleConfig, base_lr: float, epoch: int, epochs: int) -> float:
    """The learning rate for `epoch` (0-based, within a stage of `epochs` epochs).

    Warm-up rises linearly to `base_lr` over `warmup_epochs`; the schedule then runs over the
    remaining epochs (see SCHEDULES; cosine reaches 0 at the stage's end).
    """
    warmup = min(schedule.warmup_epochs, max(epochs - 1, 0))
    if epoch < warmup:
        return base_lr * (epoch + 1) / (warmup + 1)
    default_rate, rule = SCHEDULES[schedule.name]
    rate = schedule.decay_rate if schedule.decay_rate is not None else default_rate
    return rule(base_lr, epoch - warmup, max(epochs - warmup, 1), rate, schedule.decay_epochs)


OPTIMIZERS: dict[str, Callable[..., keras.optimizers.Optimizer]] = {
    "adam": lambda c, lr, **ema: keras.optimizers.Adam(lr, **ema),
    "sgd": lambda c, lr, **ema: keras.optimizers.SGD(lr, momentum=c.momentum,
                                                     nesterov=c.nesterov, **ema),
    "rmsprop": lambda c, lr, **ema: keras.optimizers.RMSprop(lr, momentum=c.momentum, **ema),
}


def compile_model(model: keras.Model, optimizer: OptimizerConfig | keras.optimizers.Optimizer,
                  learning_rate: float, jit: bool = False,
                  label_smoothing: float | None = None) -> None:
    """Compiles for the current `trainable` state (needed after every change of it); an
    optimizer instance is reused as is. With `label_smoothing` (0 included) the labels are
    one-hot rows (smoothed, or mixed by MixUp/CutMix); without, class indices."""
    if isinstance(optimizer, OptimizerConfig):
        ema = {"use_ema": True, "ema_momentum": optimizer.ema} if optimizer.ema else {}
        optimizer = OPTIMIZERS[optimizer.name](optimizer, learning_rate, **ema)
    model.compile(optimizer=optimizer, loss=training_loss(label_smoothing), metrics=["accuracy"],
                  jit_compile=jit)


def training_loss(label_smoothing: float | None) -> keras.losses.Loss:
    """Cross-entropy on class indices, or on one-hot rows with `label_smoothing` (0
    included)."""
    if label_smoothing is None:
        return keras.losses.SparseCategoricalCrossentropy()
    return keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)


def class_weights(labels: np.ndarray, num_classes: int, mode: str) -> dict[int, float] | None:
    """'balanced' weights n / (k * n_c); 'auto' uses them when the largest class outnumbers the
    smallest beyond 1.5:1; 'none' never."""
    counts = np.bincount(labels, minlength=num_classes).astype(float)
    imbalanced = counts.min() > 0 and counts.max() / counts.min() > 1.5
    if mode == "none" or (mode == "auto" and not imbalanced):
        return None
    weights = counts.sum() / (num_classes * np.maximum(counts, 1))
    return {i: float(w) for i, w in enumerate(weights)}


@dataclass(frozen=True)
class StagePlan:
    """What one stage will do; epochs are global (stage 2 continues stage 1's count)."""

    name: str
    description: str
    first_epoch: int
    last_epoch: int
    learning_rate: float
    schedule: ScheduleConfig
    rate_option: str = "--learning-rate"  # the option that sets `learning_rate`
    # the epochs the schedule runs over, when the stage ends before it (a refit, stopped at
    # the epoch its stage kept); None: the stage's own
    schedule_epochs: int | None = None

    @property
    def epochs(self) -> int:
        return self.last_epoch - self.first_epoch

    def learning_rate_at(self, epoch: int) -> float:
        return learning_rate_at(self.schedule, self.learning_rate, epoch - self.first_epoch,
                                self.schedule_epochs or self.epochs)


def stage_result(plan: StagePlan, history: Sequence[dict[str, Any]], monitor: str,
                 trainable_params: int, window: int = 1) -> StageResult:
    """Summarises a stage from its history rows (the kept epoch: best on `monitor` averaged
    over `window` epochs centred on it)."""
    rows = [r for r in history if r["stage"] == plan.name]
    kept = best_row(rows, monitor, window) or rows[-1]
    accuracies = [r["val_accuracy"] for r in rows if "val_accuracy" in r]
    return StageResult(name=plan.name, epochs=len(rows), learning_rate=plan.learning_rate,
                       trainable_params=trainable_params,
                       metrics={k: v for k, v in kept.items()
                                if k not in ("stage", "epoch", "seconds")},
                       best_epoch=kept["epoch"],
                       best_val_accuracy=max(accuracies) if accuracies else None,
                       stopped_early=len(rows) < plan.epochs)


def window_note(window: int, epochs: int) -> str:
    """How a stage of `epochs` chose its kept epoch, for the console and the report: empty
    when the window did not matter (one epoch, or --epoch-window 1)."""
    return f"on the mean of the {window} epochs around each" if window > 1 and epochs > 1 \
        else ""


@dataclass(frozen=True)
class StageInputs:
    """What one stage trains, on what, and how.

    With `optimizer`, the model is compiled for its current `trainable` state first; without,
    it keeps the optimizer it has (a resumed stage, from `first_epoch`). `train` and
    `validation` are datasets (then `val_labels` are validation's labels), or (x, y) arrays
    with `batch_size`; `label_smoothing` as compile_model takes it. With a `cluster`, `train`
    is this worker's share, trained on across the workers (workers.fit_across_workers).
    """

    model: keras.Model
    plan: StagePlan
    train: Any
    validation: Any
    steps: int  # per epoch, for the progress bar
    history: list[dict[str, Any]]  # appended to: one row per epoch
    optimizer: OptimizerConfig | None = None
    first_epoch: int | None = None
    callbacks: Sequence[keras.callbacks.Callback] = ()
    class_weight: dict[int, float] | None = None
    batch_size: int | None = None
    jit: bool = False
    val_labels: np.ndarray | None = None
    label_smoothing: float | None = None
    cluster: Cluster | None = None


def run_stage(inputs: StageInputs, reporter: Reporter) -> int:
    """Trains the stage `inputs` describe, appending one row per epoch to its history.

    Args:
        inputs: the model, its plan, the data and how to fit them.
        reporter: where progress goes.

    Returns:
        The trainable parameter count.
    """
    model, plan, train, validation = inputs.model, inputs.plan, inputs.train, inputs.validation
    optimizer, first_epoch, batch_size = inputs.optimizer, inputs.first_epoch, inputs.batch_size
    callbacks, class_weight, history = inputs.callbacks, inputs.class_weight, inputs.history
    jit, label_smoothing, cluster = inputs.jit, inputs.label_smoothing, inputs.cluster
    val_labels, steps = inputs.val_labels, inputs.steps
    if optimizer is not None:
        compile_model(model, optimizer, plan.learning_rate, jit, label_smoothing)
    counts = count_params(model)
    start = plan.first_epoch if first_epoch is None else first_epoch
    reporter.stage_started(StageInfo(plan.name, plan.description, plan.last_epoch - start,
                                     plan.learning_rate, counts.trainable,
                                     counts.non_trainable, label_smoothing))
    schedule = keras.callbacks.LearningRateScheduler(lambda epoch, lr: plan.learning_rate_at(
        epoch))
    recorder = EpochReporter(reporter, plan.name, plan.last_epoch, steps, history)
    diverged = StopOnNonFinite(plan.name, plan.rate_option)
    if cluster is not None:
        images, labels = _val_inputs(validation, val_labels)
        with native_lines_filtered():  # a worker that dies makes TensorFlow log in C++ here
            fit_across_workers(
                model, training_loss(label_smoothing), train, steps, batch_size,
                (start, plan.last_epoch), lambda: val_scores(model, images, labels, batch_size),
                [schedule, diverged, recorder, *callbacks], cluster, class_weight, seed=start)
        return counts.trainable
    train, validation, first = _for_replicas(train, validation, val_labels, batch_size)
    if model.optimizer.use_ema:
        # First, so that validation, the best-epoch bookkeeping and the checkpoints all see
        # the averaged weights; fit leaves the average in the model at its end.
        first.insert(0, keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    # A dataset arrives shuffled already; arrays are shuffled by fit.
    fit_args: dict[str, Any] = {"x": train, "validation_data": validation, "shuffle": False}
    if isinstance(train, tuple):
        fit_args = {"x": train[0], "y": train[1], "validation_data": validation,
                    "batch_size": batch_size}
    model.fit(**fit_args, epochs=plan.last_epoch, initial_epoch=start, verbose=0,
              class_weight=class_weight,
              callbacks=[*first, schedule, diverged, recorder, *callbacks])
    return counts.trainable


def _for_replicas(train: Any, validation: Any, val_labels: np.ndarray | None,
                  batch_size: int | None) -> tuple[Any, Any, list[keras.callbacks.Callback]]:
    """Under a strategy of several replicas, training arrays become a dataset that keeps a
    multiple of the replicas per pass (as build_dataset does), and val is scored by
    ValidateByPredicting instead of fit's evaluate (no validation: none, as for a refit); one
    replica changes nothing."""
    import tensorflow as tf

    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas == 1:
        return train, validation, []
    if isinstance(train, tuple):
        n = len(train[0])
        train = tf.data.Dataset.from_tensor_slices(train).shuffle(n).take(
            n - n % replicas).batch(batch_size)
    if validation is None:
        return train, None, []
    return train, None, [ValidateByPredicting(*_val_inputs(validation, val_labels), batch_size)]


def _val_inputs(validation: Any, val_labels: np.ndarray | None) -> tuple[Any, np.ndarray]:
    """Validation's inputs (a dataset of images, or an array) and its class indices."""
    if isinstance(validation, tuple):
        images, labels = validation
    else:
        images, labels = validation.map(lambda x, y: x), val_labels
    labels = np.asarray(labels)
    return images, labels.argmax(axis=1) if labels.ndim == 2 else labels  # one-hot rows

