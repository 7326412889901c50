"""How the core tells the outside world what it is doing, without knowing who listens."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class StageInfo:
    """What a training stage is about to do."""

    name: str
    description: str
    epochs: int
    learning_rate: float
    trainable_params: int
    non_trainable_params: int


class Reporter(Protocol):
    """The core's only channel for progress and diagnostics (stdout is for results)."""

    def info(self, message: str) -> None: ...

    def warning(self, message: str) -> None: ...

    def stage_started(self, stage: StageInfo) -> None: ...

    def epoch_ended(self, stage: str, epoch: int, epochs: int,
                    metrics: Mapping[str, float]) -> None: ...

    def start_progress(self, description: str, total: int | None) -> None: ...

    def advance(self, steps: int = 1) -> None: ...

    def stop_progress(self) -> None: ...


class NullReporter:
    """Says nothing: for tests and notebooks."""

    def info(self, message: str) -> None:
        pass

    def warning(self, message: str) -> None:
        pass

    def stage_started(self, stage: StageInfo) -> None:
        pass

    def epoch_ended(self, stage: str, epoch: int, epochs: int,
                    metrics: Mapping[str, float]) -> None:
        pass

    def start_progress(self, description: str, total: int | None) -> None:
        pass

    def advance(self, steps: int = 1) -> None:
        pass

    def stop_progress(self) -> None:
        pass
