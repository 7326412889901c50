"""The one owner of transferkit's cache folder ($TRANSFERKIT_HOME, else ~/.cache/transferkit):
what lives there, under which names, and clearing it.

- features/   frozen-base features by extractor and image content (features.py)
- converted/  plain RGB copies of images TensorFlow would decode wrongly (data/inspect.py)
- weights/    ImageNet weights converted to Keras files (bases/)
- inspected.json  what each file's inspection found, by size and modification time
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

FEATURES, CONVERTED, WEIGHTS = "features", "converted", "weights"
PARTS = (FEATURES, CONVERTED, WEIGHTS)
INSPECTED = "inspected.json"  # points at converted copies: cleared with them


def cache_dir() -> Path:
    """transferkit's cache folder: $TRANSFERKIT_HOME, else ~/.cache/transferkit."""
    root = os.environ.get("TRANSFERKIT_HOME")
    return Path(root) if root else Path.home() / ".cache" / "transferkit"


def cache_path(part: str) -> Path:
    """A part of the cache folder (one of PARTS, or INSPECTED)."""
    if part not in (*PARTS, INSPECTED):
        raise ValueError(f"unknown cache part {part!r}")
    return cache_dir() / part


def cache_usage() -> dict[str, tuple[int, int]]:
    """Files and bytes in each part of the cache folder."""
    usage = {}
    for part in PARTS:
        files = [f for f in cache_path(part).rglob("*") if f.is_file()]
        usage[part] = (len(files), sum(f.stat().st_size for f in files))
    return usage


def clear_cache(weights: bool = False) -> None:
    """Removes cached features and converted images (rebuilt when needed), and the converted
    ImageNet weights too when `weights`."""
    for part in (FEATURES, CONVERTED, *((WEIGHTS,) if weights else ())):
        shutil.rmtree(cache_path(part), ignore_errors=True)
    cache_path(INSPECTED).unlink(missing_ok=True)
