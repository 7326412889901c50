"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yields a temporary path next to `target`; renames it onto `target` if the body succeeds.

    The temporary name keeps `target`'s suffixes, since Keras and numpy pick formats by them.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}",
                                    dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(target: Path, text: str) -> None:
    """Writes UTF-8 text atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def cache_dir() -> Path:
    """transferkit's cache folder: $TRANSFERKIT_HOME, else ~/.cache/transferkit."""
    root = os.environ.get("TRANSFERKIT_HOME")
    return Path(root) if root else Path.home() / ".cache" / "transferkit"
