"""Small Keras callbacks that turn fit events into Reporter calls."""

from __future__ import annotations

import math
import time
from typing import Any

import keras

from transferkit.errors import TrainingDiverged
from transferkit.reporting import Reporter


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
