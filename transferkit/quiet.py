"""Keeps native libraries' chatter off the terminal: TensorFlow, absl, oneDNN, CUDA and the
TFLite interpreter print from C++ straight to file descriptor 2, where Python's own stderr
redirection cannot reach. Only their start-up is silenced, never transferkit's own messages;
`--verbose` or TRANSFERKIT_VERBOSE=1 lets everything through."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
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


# A line of absl/TensorFlow C++ logging: 'E0000 00:00:1796593777.374767   32181 file.cc:52] ...'
_NATIVE_LINE = re.compile(rb"[IWEF]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [^\]]+\] ")
_NATIVE_START = re.compile(rb"[IWEF]\d{0,4}( \d{0,2})?")  # what such a line may begin as


@contextlib.contextmanager
def native_lines_filtered() -> Iterator[None]:
    """Passes everything written to file descriptor 2 inside the block through, except the
    C++ log lines of TensorFlow and absl (a worker that died makes the others log collective
    errors there, which transferkit says in its own words). For work whose own messages must
    still show, unlike quiet_native_output. A no-op when verbose."""
    if verbose():
        yield
        return
    sys.stderr.flush()
    shown = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    pump = threading.Thread(target=_pass_all_but_native_lines, args=(read_end, shown),
                            daemon=True)
    pump.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(shown, 2)  # the pipe's last writer closes: the pump sees its end
        pump.join(timeout=10)
        os.close(shown)


def _pass_all_but_native_lines(source: int, target: int) -> None:
    """Copies `source` to `target` as it comes, holding back only what may be the start of
    a native log line until the line is whole (then dropped, if it is one)."""
    pending = b""
    with os.fdopen(source, "rb", buffering=0) as pipe:
        while chunk := pipe.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if not _NATIVE_LINE.match(line):
                    os.write(target, line + b"\n")
            if pending and not _NATIVE_START.fullmatch(pending[:8]):
                if not _NATIVE_LINE.match(pending):
                    os.write(target, pending)  # a progress bar's partial line, at once
                    pending = b""
    if pending and not _NATIVE_LINE.match(pending):
        os.write(target, pending)


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


@contextlib.contextmanager
def quiet_converter() -> Iterator[None]:
    """tf2onnx's progress logging and TensorFlow's graph-optimisation chatter kept off the
    terminal while a model is converted (runtime.py); its errors still raise."""
    loggers = [logging.getLogger(name) for name in ("tf2onnx", "onnx")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with quiet_native_output():
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
