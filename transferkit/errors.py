"""Typed user-facing errors. The core raises them; the CLI renders them once."""

import signal


class TransferkitError(Exception):
    """An error the user can fix; its message says what was wrong and what to do."""

    exit_code = 1


class DataError(TransferkitError):
    """The image folder cannot be used as given."""


class ConfigError(TransferkitError):
    """An option value, or a combination of them, is invalid: a usage error, like those the
    command line parser itself reports."""

    exit_code = 2


class MissingPackageError(TransferkitError):
    """An option needs an optional package that is not installed."""


class WeightsError(TransferkitError):
    """Pretrained weights cannot be found, fetched or loaded."""


class ArtifactError(TransferkitError):
    """A run directory, feature file or output file cannot be read or written."""


class TrainingDiverged(TransferkitError):
    """The loss became NaN or infinite: the run stops, and no model is saved as complete."""


class ClusterError(TransferkitError):
    """A cluster (Ray's, or the workers of a multi-worker run) cannot be reached, or lost a
    worker."""


class WorkerLost(ClusterError):
    """Another worker of a multi-worker run stopped answering (it died, or its machine or
    network went away): this one stops too; the chief's run can be resumed."""


class RunInterrupted(TransferkitError):
    """Training stopped on a signal; the run directory can be resumed."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention for death by signal
        self.signal_name = signal.Signals(signum).name


class StopRequested(Exception):
    """Raised inside fit() to leave it at a batch boundary, or by SIGTERM anywhere in a run.

    Keras re-raises an exception from inside a layer call as a new one of the same class
    with its own message instead of the signal number (SIGTERM while a base is being built),
    so the class also keeps the last signal number it was raised with."""

    last: int = signal.SIGTERM

    def __init__(self, signum: int | str = signal.SIGTERM) -> None:
        super().__init__(signum)
        if isinstance(signum, int):
            StopRequested.last = signum
        self.signum = signum if isinstance(signum, int) else StopRequested.last
