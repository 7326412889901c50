"""Every Keras callback transferkit trains with: progress to the Reporter, stopping on a
non-finite loss, per-epoch checkpoints with the stage's best and early stopping
(StageMonitor), and SIGINT/SIGTERM honoured at a batch boundary (StopOnSignal). One rule
says whether an epoch is better (`improves`)."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import keras
import numpy as np

from transferkit.errors import StopRequested, TrainingDiverged
from transferkit.inference import inference_step
from transferkit.reporting import Reporter
from transferkit.runs.checkpoints import (
    keep_last_as_best,
    save_best,
    save_checkpoint,
    save_head_state,
)


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


def val_scores(model: keras.Model, images: Any, labels: np.ndarray,
               batch_size: int | None) -> tuple[float, float]:
    """val_loss and val_accuracy from this process alone (`model` called batch by batch, no
    collective: as the chief of a multi-worker run scores val too); `images` a dataset of
    batches, or an array split into `batch_size` rows."""
    import tensorflow as tf

    if not isinstance(images, tf.data.Dataset):
        images = tf.data.Dataset.from_tensor_slices(images).batch(batch_size or 32)
    step = inference_step(model, images.element_spec)
    probabilities = np.concatenate([np.asarray(step(x), np.float32) for x in images])
    return _scores(probabilities, labels)


def _scores(probabilities: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    picked = probabilities[np.arange(len(labels)), labels]
    return (float(-np.mean(np.log(np.clip(picked, 1e-7, 1.0)))),
            float(np.mean(probabilities.argmax(axis=1) == labels)))


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


def improves(monitor: str, row: dict[str, Any], best: dict[str, Any] | None) -> bool:
    """Whether an epoch's metrics beat `best` on `monitor`. Validation accuracy on small sets
    ties often, so a tie goes to the lower validation loss."""
    if monitor not in row:
        return False
    if best is None:
        return True
    if monitor.endswith("loss"):
        return row[monitor] < best[monitor]
    if row[monitor] != best[monitor]:
        return row[monitor] > best[monitor]
    return row.get("val_loss", float("inf")) < best.get("val_loss", float("inf"))


def best_correct(rows: Sequence[dict[str, Any]], val_images: int) -> int:
    """The most val images any of these epochs got right."""
    return max((round(r["val_accuracy"] * val_images) for r in rows if "val_accuracy" in r),
               default=0)


def projected_correct(rows: Sequence[dict[str, Any]], val_images: int, last_epoch: int
                      ) -> float:
    """Where a stage's best would be by its last epoch at the pace it has gained so far
    (its best over its first epoch's, per epoch since): a stage still climbing fast is on
    course even below the bar; one that has flattened out below it is not."""
    right = [round(r["val_accuracy"] * val_images) for r in rows if "val_accuracy" in r]
    if len(right) < 2:
        return float("inf")
    pace = (max(right) - right[0]) / (len(right) - 1)
    return max(right) + pace * max(last_epoch - rows[-1]["epoch"], 0)


def best_row(rows: Sequence[dict[str, Any]], monitor: str) -> dict[str, Any] | None:
    """The epoch row that is best on `monitor` (the earliest of equals)."""
    best = None
    for row in rows:
        if improves(monitor, row, best):
            best = row
    return best


class StageMonitor(keras.callbacks.Callback):
    """After each epoch: checkpoint it, so that a crash or kill -9 loses at most the epoch in
    progress; keep the stage's best weights; and stop the stage once `patience` epochs pass
    without improvement (0: never). Driven by the history rows, so it carries on correctly
    after a resume.

    Training through the base, each epoch saves the classifier (0.50 s for Lite0 at 224 px on
    2 CPU cores, fsync included; such an epoch takes many seconds). A head trained on cached
    features changes only the head, and its epochs take milliseconds: each writes the head's
    weights, the best ones so far and the optimizer state (4 ms, 0.2 MB), beside the
    classifier saved once when the stage started; `finish` writes the full checkpoints once
    at the stage's end.

    With `needed` (val images a stage must get right to be kept: the best candidate before it
    plus training.choice's LEAST_WIN, the least a win by more than noise takes), a stage that
    after `judge_after` epochs is below it and would still be below it at its last epoch
    (`last_epoch`) at the pace it has gained so far is stopped too: it is not on course to be
    kept, and the minutes would buy nothing.
    """

    def __init__(self, run_dir: Path, stage: str, monitor: str, patience: int,
                 classifier: keras.Model, history: list[dict[str, Any]],
                 best: list[np.ndarray] | None = None, needed: int = 0,
                 val_images: int = 0, last_epoch: int = 0, judge_after: int = 0) -> None:
        super().__init__()
        self.run_dir, self.stage, self.monitor, self.patience = run_dir, stage, monitor, patience
        self.classifier, self.history = classifier, history
        self.best = best  # head-only: the best epoch's head weights so far
        self.state: dict[str, Any] | None = None  # of the last completed epoch
        self.needed, self.val_images, self.last_epoch = needed, val_images, last_epoch
        self.judge_after = judge_after  # 0: never judged on course

    @property
    def head_only(self) -> bool:
        """Whether the model being fitted is the head alone, on cached features."""
        return self.model is not self.classifier

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        rows = [r for r in self.history if r["stage"] == self.stage]
        improved = improves(self.monitor, rows[-1], best_row(rows[:-1], self.monitor))
        self.state = {"stage": self.stage, "epoch": epoch + 1, "history": self.history}
        if self.head_only:
            weights = self.model.get_weights()
            if improved:
                self.best = weights
            optimizer = [v.numpy() for v in self.classifier.optimizer.variables]
            save_head_state(self.run_dir, weights, self.best, optimizer, self.state)
        else:
            save_checkpoint(self.run_dir, self.classifier, self.state)
            if improved:  # the checkpoint just written is the best: copied, not saved again
                keep_last_as_best(self.run_dir, self.stage)
        best = best_row(rows, self.monitor)
        if self.patience and best is not None and \
                rows[-1]["epoch"] - best["epoch"] >= self.patience:
            self.model.stop_training = True  # the model being fitted: classifier or head
        if self.judge_after and len(rows) >= self.judge_after and projected_correct(
                rows, self.val_images, self.last_epoch) < self.needed:
            self.model.stop_training = True

    def finish(self) -> None:
        """At the stage's end, head-only: the best model and the last epoch's, in full."""
        if self.state is None or not self.head_only:
            return
        last = self.model.get_weights()
        if self.best is not None:
            self.model.set_weights(self.best)
            save_best(self.run_dir, self.classifier, self.stage)
            self.model.set_weights(last)
        save_checkpoint(self.run_dir, self.classifier, self.state)


@contextlib.contextmanager
def raise_on_sigterm() -> Iterator[None]:
    """While inside, SIGTERM raises StopRequested where the program is, as Ctrl-C raises
    KeyboardInterrupt, so a run stopped outside its epochs (reading data, fitting the probe)
    still records that it was stopped. StopOnSignal takes over during the epochs."""
    def stop(signum: int, frame: FrameType | None) -> None:
        raise StopRequested(signum)

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
                if signal.getsignal(signum) is not signal.SIG_IGN:  # e.g. nohup'd: keep it so
                    self._previous[signum] = signal.signal(signum, self._request)
        return self

    def _request(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        if signal.SIGINT in self._previous:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        self.reporter.warning(f"{signal.Signals(signum).name} received: stopping at the end of "
                              f"the current batch (Ctrl-C again to abort at once).")

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def check(self, *args: Any, **kwargs: Any) -> None:
        """Raises StopRequested when a stop was requested (a callback at every boundary)."""
        if self.signum is not None:
            raise StopRequested(self.signum)

    def callback(self) -> keras.callbacks.Callback:
        return keras.callbacks.LambdaCallback(on_train_batch_end=self.check,
                                              on_test_batch_end=self.check,
                                              on_epoch_end=self.check)
