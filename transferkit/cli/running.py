"""What every command does around its core: transferkit's errors rendered once, without a
traceback, with their exit codes; TensorFlow loaded once the cheap checks passed."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import TYPE_CHECKING

import typer

from transferkit.errors import StopRequested, TransferkitError
from transferkit.quiet import load_tensorflow

if TYPE_CHECKING:
    from transferkit.config import RuntimeConfig


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Renders transferkit's errors once, without a traceback, and sets the exit code."""
    from transferkit.cli.console import print_error

    try:
        yield
    except TransferkitError as exc:
        print_error(str(exc))
        raise typer.Exit(exc.exit_code) from None
    except OSError as exc:
        from transferkit.files import describe_write_error

        message = describe_write_error(exc)
        if message is None:
            raise
        print_error(message)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        print_error("Interrupted.")
        raise typer.Exit(130) from None
    except StopRequested as exc:  # SIGTERM before a run had a record to say so in
        print_error(f"Stopped by {signal.Signals(exc.signum).name} before the run began.")
        raise typer.Exit(128 + exc.signum) from None


def load(runtime: RuntimeConfig | None = None) -> None:
    """TensorFlow, once the cheap checks passed, and the runtime of the forward passes that
    do not train (`runtime`, for the commands that run any); the cache is in use from here
    on."""
    from transferkit.cache import share_cache

    note = share_cache()
    if note is not None:
        from transferkit.cli.console import RichReporter

        RichReporter().warning(note)
    load_tensorflow()
    if runtime is not None:
        from transferkit.runtime import configure

        configure(runtime.runtime, runtime.threads)
