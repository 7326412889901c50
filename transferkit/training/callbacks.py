"""Every Keras callback transferkit trains with: progress to the Reporter, stopping on a
non-finite loss, one comparator of a stage's epochs (EpochTracker, by `improves`) with
checkpointing (Checkpointer) and stopping (EarlyStopping, and OffCourseStopping for a stage
not on course to be kept) as small callbacks on it, and SIGINT/SIGTERM honoured at a batch
boundary (StopOnSignal)."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from transferkit.errors import TrainingDiverged
from transferkit.inference import val_scores
from transferkit.reporting import Reporter
from transferkit.runs.checkpoints import (
    keep_as_best,
    save_best,
    save_checkpoint,
    save_head_state,
)
from transferkit.training.choice import projected_correct


class EpochReporter(keras.callbacks.Callback):
    """Per-epoch progress bar and summary line; also records each epoch's row of history,
    with its seconds (training and validation)."""

    def __init__(self, reporter: Reporter, stage: str, last_epoch: int, steps: int,
                 rows: list[dict[str, Any]]) -> None:
        super().__init__()
        self.reporter = reporter
        self.stage = stage
        self.last_epoch = last_epoch
        self.steps = steps
        self.rows = rows  # appended to: the run's history across stages
        self.started = time.monotonic()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.started = time.monotonic()
        self.reporter.start_progress(f"{self.stage} epoch {epoch + 1}/{self.last_epoch}",
                                     self.steps)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.reporter.advance()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.reporter.stop_progress()
        metrics = {k: float(v) for k, v in (logs or {}).items()}
        metrics["learning_rate"] = float(keras.ops.convert_to_numpy(
            self.model.optimizer.learning_rate))
        metrics["seconds"] = round(time.monotonic() - self.started, 3)  # training + validation
        self.rows.append({"stage": self.stage, "epoch": epoch + 1, **metrics})
        self.reporter.epoch_ended(self.stage, epoch + 1, self.last_epoch, metrics)


class ValidateByPredicting(keras.callbacks.Callback):
    """val_loss and val_accuracy from this process's own pass over val (`val_scores`), for a
    model trained on several replicas. Keras 3's evaluate under tf.distribute fails on a batch
    that does not split evenly across the replicas (a val split of 3 images on 2 GPUs), and
    padding to an even count skews the metrics (zero sample weights still count in them); a
    plain pass has neither problem. It runs before every callback that reads the epoch's
    logs."""

    def __init__(self, images: Any, labels: np.ndarray, batch_size: int | None) -> None:
        super().__init__()
        self.images, self.labels, self.batch_size = images, labels, batch_size

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is not None:
            logs["val_loss"], logs["val_accuracy"] = val_scores(
                self.model, self.images, self.labels, self.batch_size)


class StopOnNonFinite(keras.callbacks.Callback):
    """Ends training at the end of an epoch whose training or validation loss is NaN or
    infinite, before any other callback sees that epoch (so it is never checkpointed)."""

    def __init__(self, stage: str, option: str) -> None:
        super().__init__()
        self.stage, self.option = stage, option

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        for key in ("loss", "val_loss"):
            value = float((logs or {}).get(key, 0.0))
            if not math.isfinite(value):
                rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
                raise TrainingDiverged(
                    f"The {'validation ' if key == 'val_loss' else ''}loss became {value} in "
                    f"epoch {epoch + 1} (stage '{self.stage}', learning rate {rate:.3g}), so "
                    f"training stopped and no model was saved. Lower {self.option} (a tenth is "
                    f"a good first try, or use --lr-find) and start again with --overwrite.")


# Scores closer than this tie. Keras reports accuracies as float32 and the window averages
# them, so 3 epochs at 0.96 averaged to 0.9599999785 and 0.97, 0.96, 0.95 to 0.9599999984:
# without it, rounding decided a tie that belongs to the val loss (digits, seed 2). A real
# difference is at least 1 / (3 x val images), above this for any val split under 300,000.
TIE = 1e-6


def improves(monitor: str, row: dict[str, Any], best: dict[str, Any] | None) -> bool:
    """Whether an epoch's metrics beat `best` on `monitor`. Validation accuracy on small sets
    ties often, so a tie goes to the lower validation loss."""
    if monitor not in row:
        return False
    if best is None:
        return True
    if monitor.endswith("loss"):
        return row[monitor] < best[monitor]
    if abs(row[monitor] - best[monitor]) > TIE:
        return row[monitor] > best[monitor]
    return row.get("val_loss", float("inf")) < best.get("val_loss", float("inf"))


def smoothed(rows: Sequence[dict[str, Any]], window: int) -> list[dict[str, Any]]:
    """The rows with each validation metric averaged over the `window` epochs centred on the
    row (fewer at the ends)."""
    half = window // 2
    out = []
    for i, row in enumerate(rows):
        near = rows[max(0, i - half):i + half + 1]
        out.append({**row, **{k: sum(r[k] for r in near) / len(near) for k in row
                              if k.startswith("val_") and all(k in r for r in near)}})
    return out


def best_row(rows: Sequence[dict[str, Any]], monitor: str, window: int = 1,
             among: int | None = None) -> dict[str, Any] | None:
    """The epoch row that is best on `monitor` averaged over `window` epochs centred on it
    (the earliest of equals), among the first `among` rows (all by default)."""
    scored = smoothed(rows, window)
    best = None
    for i in range(len(rows) if among is None else among):
        if improves(monitor, scored[i], None if best is None else scored[best]):
            best = i
    return None if best is None else rows[best]


class EpochTracker(keras.callbacks.Callback):
    """The one comparator of a stage's epochs (as fastai's TrackerCallback): after each epoch
    it reads the stage's rows of the history and says which epoch is the best so far
    (`best`) and whether that changed (`improved`), by `improves` on the metric averaged over
    `window` (1 or 3) epochs centred on each. An epoch's average is known `lag` (window // 2)
    epochs after it, so `improved` is about the epoch `lag` back; `finish` settles the last
    one on its shorter window when the stage ends. Driven by the history, so it carries on
    correctly after a resume. The callbacks that act on it (Checkpointer, EarlyStopping)
    come after it in the list."""

    def __init__(self, stage: str, monitor: str, history: list[dict[str, Any]],
                 window: int = 1) -> None:
        super().__init__()
        self.stage, self.monitor, self.history, self.window = stage, monitor, history, window
        self.lag = window // 2
        self.rows: list[dict[str, Any]] = []
        self.improved = False
        self.best: dict[str, Any] | None = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.rows = [r for r in self.history if r["stage"] == self.stage]
        settled = max(0, len(self.rows) - self.lag)
        # the best among the epochs settled before this one: the last answer (their averages
        # do not change), found again only on a stage's first epoch here, or after a resume
        before = self.best or best_row(self.rows, self.monitor, self.window,
                                       max(0, settled - 1))
        self.best = best_row(self.rows, self.monitor, self.window, settled)
        self.improved = settled > 0 and self.best is not before

    def finish(self) -> bool:
        """Settles the stage's last `lag` epochs on their shorter windows; whether the best
        is now the last epoch (then its weights are the model's as it stands)."""
        self.rows = [r for r in self.history if r["stage"] == self.stage]
        self.best = best_row(self.rows, self.monitor, self.window)
        return self.best is not None and self.best is self.rows[-1] and self.lag > 0


class Checkpointer(keras.callbacks.Callback):
    """After each epoch: checkpoint it, so that a crash or kill -9 loses at most the epoch in
    progress, and keep the stage's best weights (`tracker` says which epoch is better, and
    how many epochs back it is: the previous epoch's checkpoint, or head weights, are kept
    for that).

    Training through the base, each epoch saves the classifier (0.50 s for Lite0 at 224 px on
    2 CPU cores, fsync included; such an epoch takes many seconds). A head trained on cached
    features changes only the head, and its epochs take milliseconds: each writes the head's
    weights, the best ones so far and the optimizer state (4 ms, 0.2 MB), beside the
    classifier saved once when the stage started; `finish` writes the full checkpoints once
    at the stage's end.
    """

    def __init__(self, tracker: EpochTracker, run_dir: Path, classifier: keras.Model,
                 best: list[np.ndarray] | None = None) -> None:
        super().__init__()
        self.tracker, self.run_dir, self.classifier = tracker, run_dir, classifier
        self.best = best  # head-only: the best epoch's head weights so far
        self.previous: list[np.ndarray] | None = None  # head-only: the epoch before's
        self.state: dict[str, Any] | None = None  # of the last completed epoch

    @property
    def head_only(self) -> bool:
        """Whether the model being fitted is the head alone, on cached features."""
        return self.model is not self.classifier

    def on_train_begin(self, logs: dict | None = None) -> None:
        if self.head_only:  # a resumed stage's last epoch, if the next settles it
            self.previous = self.model.get_weights()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        stage, lag = self.tracker.stage, self.tracker.lag
        self.state = {"stage": stage, "epoch": epoch + 1, "history": self.tracker.history}
        if self.head_only:
            weights = self.model.get_weights()
            if self.tracker.improved:
                self.best = self.previous if lag else weights
            self.previous = weights
            optimizer = [v.numpy() for v in self.classifier.optimizer.variables]
            save_head_state(self.run_dir, weights, self.best, optimizer, self.state)
        else:
            save_checkpoint(self.run_dir, self.classifier, self.state, keep_previous=lag > 0)
            if self.tracker.improved:  # a checkpoint on disk: copied, not saved again
                keep_as_best(self.run_dir, stage, previous=lag > 0)

    def finish(self) -> None:
        """At the stage's end: the last epoch kept as best if its shorter window made it so;
        head-only, the best model and the last epoch's, in full."""
        if self.state is None:
            return
        last_is_best = self.tracker.finish()
        if not self.head_only:
            if last_is_best:
                keep_as_best(self.run_dir, self.tracker.stage, previous=False)
            return
        last = self.model.get_weights()
        if last_is_best:
            self.best = last
        if self.best is not None:
            self.model.set_weights(self.best)
            save_best(self.run_dir, self.classifier, self.tracker.stage)
            self.model.set_weights(last)
        save_checkpoint(self.run_dir, self.classifier, self.state)


class EarlyStopping(keras.callbacks.Callback):
    """Stops the stage once `patience` epochs passed since its best (0: never)."""

    def __init__(self, tracker: EpochTracker, patience: int) -> None:
        super().__init__()
        self.tracker, self.patience = tracker, patience

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        best, rows = self.tracker.best, self.tracker.rows
        if self.patience and best is not None and \
                rows[-1]["epoch"] - best["epoch"] >= self.patience:
            self.model.stop_training = True  # the model being fitted: classifier or head


class OffCourseStopping(EarlyStopping):
    """EarlyStopping that also stops a stage not on course to be kept: one that, after
    `judge_after` epochs (0: never judged), is below `needed` (val images a stage must get
    right to be kept: the best candidate before it plus training.choice's LEAST_WIN, the
    least a win by more than noise takes) and would still be below it at its last epoch
    (`last_epoch`) at the pace it has gained so far. The minutes would buy nothing."""

    def __init__(self, tracker: EpochTracker, patience: int, needed: int, val_images: int,
                 last_epoch: int, judge_after: int) -> None:
        super().__init__(tracker, patience)
        self.needed, self.val_images, self.last_epoch = needed, val_images, last_epoch
        self.judge_after = judge_after

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        super().on_epoch_end(epoch, logs)
        rows = self.tracker.rows
        if self.judge_after and len(rows) >= self.judge_after and projected_correct(
                rows, self.val_images, self.last_epoch) < self.needed:
            self.model.stop_training = True
