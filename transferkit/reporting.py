"""How the core tells the outside world what it is doing, without knowing who listens."""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol


def printable(text: str) -> str:
    """`text` with the undecodable bytes of a file name (lone surrogates) shown as U+FFFD,
    for places that cannot carry them, such as a figure's caption."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def fits_one_line(name: str) -> bool:
    """Whether `name` has no control character and nothing that splits a line (a labels file,
    a CSV row and a terminal line hold it intact)."""
    return bool(name) and not any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in name)


@dataclass(frozen=True)
class StageInfo:
    """What a training stage is about to do."""

    name: str
    description: str
    epochs: int
    learning_rate: float
    trainable_params: int
    non_trainable_params: int
    label_smoothing: float | None = None  # said when it is on


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
