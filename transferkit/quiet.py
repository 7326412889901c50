"""Keeps native libraries' chatter off the terminal: TensorFlow, absl, oneDNN, CUDA and the
TFLite interpreter print from C++ straight to file descriptor 2, where Python's own stderr
redirection cannot reach. Only their start-up is silenced, never transferkit's own messages;
`--verbose` or TRANSFERKIT_VERBOSE=1 lets everything through."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

VERBOSE_ENV = "TRANSFERKIT_VERBOSE"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def set_verbose(on: bool) -> None:
    """Turns the native libraries' logs on for this process and its children."""
    if on:
        os.environ[VERBOSE_ENV] = "1"
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"


@contextlib.contextmanager
def quiet_native_output() -> Iterator[None]:
    """Sends file descriptor 2 to /dev/null inside the block and restores it after, also when
    the block raises (so a Python traceback still shows). A no-op when verbose."""
    if verbose():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def load_tensorflow() -> None:
    """Imports TensorFlow and Keras with their start-up lines silenced, and keeps their
    Python loggers to errors. Call it before importing anything that imports Keras."""
    if "tensorflow" in sys.modules and "keras" in sys.modules:
        return
    with quiet_native_output():
        import keras  # noqa: F401
        import tensorflow as tf

        tf.config.list_physical_devices()  # CUDA probes (and fails) here, not mid-command
    if not verbose():
        tf.get_logger().setLevel(logging.ERROR)
        logging.getLogger("absl").setLevel(logging.ERROR)
