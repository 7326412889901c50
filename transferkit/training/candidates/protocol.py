"""What a candidate is (`Candidate`) and what fitting one gives (`Fitted`): the protocol
every row of the table in training/candidates/__init__.py follows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from transferkit.training.loop import Training
    from transferkit.training.probe import LinearProbe


@dataclass(frozen=True)
class Fitted:
    """A candidate fitted on train and scored on val."""

    name: str  # as the choice and the run's files name it (a variant: by its kind of change)
    right: np.ndarray  # which val images it got right
    summary: str  # what it is and how it was fitted, for the console and the report
    seconds: float
    save: Callable[[Training], None]  # writes its model into the run, once it won
    details: dict[str, Any] = field(default_factory=dict)  # recorded as they are
    # --unlabeled's candidates: the pool images it labelled (files decoded) and their classes,
    # which the stages train on too when it did as well as the probe on val
    pseudo: tuple[tuple[str, ...], np.ndarray] | None = None


class Candidate(Protocol):
    """One row of the table."""

    kind: str  # the row's name, recorded with each candidate it fits
    phase: str  # what the run is doing while it is fitted (a signal's record says it)
    after_checks: bool  # it reads the data checks' findings, so it is fitted after them
    own_features: bool  # its model reads the run's frozen base's features, as the probe's

    def fit(self, run: Training, probe: LinearProbe) -> Fitted | None:
        """The candidate fitted on `run`'s train split and scored on val (`probe`: the run's
        linear probe); None when it does not apply to this run (an option, the base, the
        data checks' findings).

        Args:
            run: the run being trained, its frozen features at hand
                (`run.frozen_features()`).
            probe: the linear probe fitted first, which the candidate may start from.

        Returns:
            The fitted candidate, or None.
        """
        ...
