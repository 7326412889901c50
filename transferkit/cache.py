"""The one owner of transferkit's cache folder ($TRANSFERKIT_HOME, else ~/.cache/transferkit):
what lives there, under which names, and clearing it.

- features/   frozen-base features by extractor and image content (features.py)
- converted/  plain RGB copies of images TensorFlow would decode wrongly (data/inspect.py)
- weights/    ImageNet weights converted to Keras files (bases/)
- graphs/     models converted for ONNX Runtime, by content, digest in the name (runtime.py)
- inspected.json  what each file's inspection found, by size and modification time
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import re
import shutil
import tempfile
from pathlib import Path

from transferkit.errors import ArtifactError

FEATURES, CONVERTED, WEIGHTS, GRAPHS = "features", "converted", "weights", "graphs"
PARTS = (FEATURES, CONVERTED, WEIGHTS, GRAPHS)
# The names transferkit gives the files of each part (features.FeatureCache,
# data/inspect.converted_path, bases' converted weights), and the temporary names they are
# written under: clearing deletes these and nothing else, whatever else a folder holds.
_WRITTEN = {FEATURES: re.compile(r"[0-9a-f]{24}\.npz"),
            CONVERTED: re.compile(r"[0-9a-f]{64}-v\d+\.png"),
            WEIGHTS: re.compile(r"\w+_imagenet_[0-9a-f]{12}\.weights\.h5"),
            GRAPHS: re.compile(r"[0-9a-f]{24}(-[0-9a-f]{16}\.onnx|\.lock)")}
# files.atomic_path's temporary names (files._TEMP_NAME: the cache imports no other module)
_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{8}\.tmp.*")
INSPECTED = "inspected.json"  # points at converted copies: cleared with them
LOCK = ".in-use.lock"  # shared by every process using the cache; clearing takes it alone
_held: list[int] = []  # this process's shared lock, held until it exits
_checked: set[Path] = set()  # cache folders found usable (cache_path runs once per image)
_stand_in: list[Path] = []  # this process's temporary cache, when the real one is read-only


def cache_dir() -> Path:
    """transferkit's cache folder: $TRANSFERKIT_HOME, else ~/.cache/transferkit.

    Raises:
        ArtifactError: it, or a folder above it, is a file.
    """
    root = os.environ.get("TRANSFERKIT_HOME")
    folder = Path(root) if root else Path.home() / ".cache" / "transferkit"
    if folder in _checked:
        return folder
    for above in (folder, *folder.parents):
        if above.exists() and not above.is_dir():
            where = "TRANSFERKIT_HOME" if root else "transferkit's cache folder"
            raise ArtifactError(f"{where} is '{folder}', but '{above}' is a file, not a "
                                f"folder. Point TRANSFERKIT_HOME at a folder (it is created "
                                f"if missing), or move the file.")
    _checked.add(folder)
    return folder


def share_cache() -> str | None:
    """Marks the cache as in use by this process until it exits (a shared lock), so that
    `transferkit cache --clear` in another process waits for no one and deletes nothing
    this process reads.

    A cache folder that cannot be written (a read-only home, a full disk) is no reason to
    stop: this process then caches in a temporary folder, removed when it exits. Returns a
    note saying so, else None.
    """
    if _held or _stand_in:
        return None
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)
        _held.append(fd)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".transferkit-probe."):
            pass  # what the folder really accepts (root passes permission checks)
    except OSError as exc:
        stand_in = Path(tempfile.mkdtemp(prefix="transferkit-cache-"))
        atexit.register(shutil.rmtree, stand_in, ignore_errors=True)
        _stand_in.append(stand_in)
        return (f"The cache folder '{folder}' cannot be written ({exc.strerror or exc}), so "
                f"features and converted weights are cached only while this command runs. "
                f"Point TRANSFERKIT_HOME at a writable folder to keep them between commands.")
    return None


def cache_path(part: str) -> Path:
    """A part of the cache folder (one of PARTS, or INSPECTED)."""
    if part not in (*PARTS, INSPECTED):
        raise ValueError(f"unknown cache part {part!r}")
    return (_stand_in[0] if _stand_in else cache_dir()) / part


def cache_usage() -> dict[str, tuple[int, int]]:
    """Files and bytes in each part of the cache folder."""
    usage = {}
    for part in PARTS:
        files = [f for f in cache_path(part).rglob("*") if f.is_file()]
        usage[part] = (len(files), sum(f.stat().st_size for f in files))
    return usage


def clear_cache(weights: bool = False) -> None:
    """Removes cached features, converted images and graphs (rebuilt when needed), and the
    converted ImageNet weights too when `weights`.

    Raises:
        ArtifactError: another transferkit process is using the cache.
    """
    folder = cache_dir()
    if not folder.is_dir():
        return
    while _held:  # this process's own use ends here
        os.close(_held.pop())
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ArtifactError(f"Another transferkit process is using the cache in '{folder}' "
                            f"(a run may read its converted images and features). Clear it "
                            f"when that process has ended.") from None
    try:
        for part in (FEATURES, CONVERTED, GRAPHS, *((WEIGHTS,) if weights else ())):
            _clear_part(cache_path(part), _WRITTEN[part])
        cache_path(INSPECTED).unlink(missing_ok=True)
    finally:
        os.close(fd)


def _clear_part(folder: Path, written: re.Pattern[str]) -> None:
    """Deletes the files transferkit wrote in `folder` (named as `written` says, or a
    temporary name), then the folder if that left it empty: a TRANSFERKIT_HOME pointed at a
    folder of the user's keeps everything else."""
    if not folder.is_dir() or folder.is_symlink():
        return
    for path in folder.iterdir():
        if path.is_file() and not path.is_symlink() and (
                written.fullmatch(path.name) or _TEMPORARY.fullmatch(path.name)):
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()
