"""Typed user-facing errors. The core raises them; the CLI renders them once."""

import signal
from collections.abc import Sequence


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

    @classmethod
    def needs(cls, what: str, missing: Sequence[str], extra: str,
              instead: str = "") -> "MissingPackageError":
        """'`what` needs X and Y, which are not installed. Run: <the command that installs
        the extra for how transferkit was installed>`instead`'."""
        names = " and ".join(missing)
        return cls(f"{what} needs {names}, which {'is' if len(missing) == 1 else 'are'} not "
                   f"installed. Run: {install_command(extra)}{instead}")


def install_command(extra: str) -> str:
    """The pip command that adds an extra to this transferkit: from its clone (editable or
    not) or wheel file when it was installed from one, else from the package index."""
    import json  # here, not at start-up: every command imports this module
    from importlib import metadata
    from urllib.parse import unquote, urlparse

    # pip's record of where it installed from (a clone's own egg-info, found first from
    # inside the clone, has none)
    texts = [d.read_text("direct_url.json") for d in metadata.distributions(name="transferkit")]
    try:
        origin = next((json.loads(t) for t in texts if t), {})
    except ValueError:
        origin = {}
    url = urlparse(origin.get("url", ""))
    if url.scheme != "file":
        return f'pip install "transferkit[{extra}]"'
    editable = origin.get("dir_info", {}).get("editable", False)
    return f'pip install {"-e " if editable else ""}"{unquote(url.path)}[{extra}]"'


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
        self.signum = signum
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
