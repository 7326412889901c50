"""How a run hears SIGINT and SIGTERM: anywhere in it, SIGTERM raises StopRequested as
Ctrl-C raises KeyboardInterrupt (`raise_on_sigterm`); during the epochs, both ask training to
stop at the next batch boundary (`StopOnSignal`), so no checkpoint is cut mid-write."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType, TracebackType
from typing import Any

import keras

from transferkit.errors import StopRequested
from transferkit.reporting import Reporter


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
