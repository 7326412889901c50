"""Writing files safely: atomic writes that respect the umask and reach the disk, and the
refusal to replace a user's output unless asked."""

from __future__ import annotations

import base64
import contextlib
import errno
import fnmatch
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transferkit.errors import ArtifactError

# Why a write failed, for the errors a user can fix; anything else stays a bug's traceback.
WRITE_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied",
                errno.ENAMETOOLONG: "the name is too long for the file system",
                errno.ENOTDIR: "a part of the path is a file, not a folder"}
TEMP_OVERHEAD = 1 + 1 + 8 + 4  # atomic_path's temp name: "." + name + "." + 8 hex + ".tmp"
_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp")  # what atomic_path names its temp files


def _fsync_folder(folder: Path) -> None:
    """Makes a rename in `folder` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename still happened
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yields a temporary path next to `target`; if the body succeeds, the file is flushed to
    disk and renamed onto `target`, and the rename made durable.

    The temporary file is created with mode 0666 less the umask, as `open` would create
    `target` itself (mkstemp's 0600 would make every output private). Its name keeps
    `target`'s suffixes, since Keras and numpy pick formats by them.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(target.suffixes)
    while True:
        tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp{suffix}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
        except OSError as exc:  # a folder that takes no new files: the user's to fix
            raise _cannot_create(target.parent, exc) from exc
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, target)
        _fsync_folder(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(target: Path, text: str) -> None:
    """Writes UTF-8 text atomically. File names that are not valid UTF-8 (Python holds their
    bytes as lone surrogates) are written as those bytes, so they read back exactly with
    errors="surrogateescape"."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8", errors="surrogateescape")


BYTES_SUFFIX = "_bytes"  # beside a name that is not UTF-8: its exact bytes, base64
KEY_BYTES = "_key_bytes"  # in a table keyed by names: {readable key: its exact bytes}


def lossless_json(value: Any) -> Any:
    """`value` ready for JSON, whose text must be Unicode while a file or folder name need not
    be (Python holds its bad bytes as lone surrogates). The one convention everywhere a name
    is written as JSON: such a name is written readable (its bad bytes as U+FFFD) and its
    exact bytes go beside it in base64, under the key's name + "_bytes" (for a list of names,
    a list with null for the names that needed none; for a table keyed by names, the
    readable keys' bytes under "_key_bytes"). `restore_names` maps it back."""
    readable, _ = _lossless(value)
    return readable


def _lossless(value: Any) -> tuple[Any, Any]:
    """(value made readable, its exact bytes in base64 or None when nothing was changed)."""
    if isinstance(value, str):
        raw = os.fsencode(value)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", "replace"), base64.b64encode(raw).decode("ascii")
        return value, None
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        keys: dict[str, str] = {}
        for key, item in value.items():
            readable, raw_key = _lossless(key) if isinstance(key, str) else (key, None)
            if raw_key is not None:
                keys[readable] = raw_key
            out[readable], raw = _lossless(item)
            if raw is not None:
                out[readable + BYTES_SUFFIX] = raw
        if keys:
            out[KEY_BYTES] = keys
        return out, None
    if isinstance(value, (list, tuple)):
        pairs = [_lossless(item) for item in value]
        raws = [raw for _, raw in pairs]
        return [item for item, _ in pairs], raws if any(r is not None for r in raws) else None
    return value, None


def restore_names(value: Any) -> Any:
    """The names `lossless_json` wrote, with their exact bytes again (as Python holds them:
    lone surrogates), and the "_bytes" entries gone."""
    if isinstance(value, list):
        return [restore_names(item) for item in value]
    if not isinstance(value, dict):
        return value
    out = {key: restore_names(item) for key, item in value.items() if key != KEY_BYTES}
    for key in [k for k in out if k.endswith(BYTES_SUFFIX) and k[:-len(BYTES_SUFFIX)] in out]:
        out[key[:-len(BYTES_SUFFIX)]] = _from_bytes(out[key[:-len(BYTES_SUFFIX)]],
                                                     out.pop(key))
    keys = value.get(KEY_BYTES)
    if isinstance(keys, dict):
        out = {_from_bytes(k, keys[k]) if k in keys else k: v for k, v in out.items()}
    return out


def _from_bytes(readable: Any, raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return os.fsdecode(base64.b64decode(raw, validate=True))
        except ValueError:
            return readable  # a damaged entry: the readable name is the best left
    if isinstance(raw, list) and isinstance(readable, list) and len(raw) == len(readable):
        return [_from_bytes(v, r) if r is not None else v
                for v, r in zip(readable, raw, strict=True)]
    return readable


def json_text(value: Any, indent: int | None = 2) -> str:
    """JSON (indented, or on one line with `indent=None`), non-ASCII kept readable, names
    that are not UTF-8 written by `lossless_json`'s convention."""
    return json.dumps(lossless_json(value), indent=indent, ensure_ascii=False) + "\n"


def write_json(target: Path, value: Any) -> None:
    """Writes a JSON document atomically."""
    write_text(target, json_text(value))


def npz_problem(exc: BaseException) -> str:
    """What was wrong with an .npz that np.load(allow_pickle=False) refused, in plain words
    (numpy's own message for a file that is no archive suggests loading it unsafely)."""
    if isinstance(exc, KeyError):
        return f"it lacks the array {exc}"
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.strerror or str(exc)
    return "it is not a NumPy .npz archive, or a damaged one"


def save_figure(path: Path, figure: Any) -> None:
    """Writes a matplotlib figure as PNG, atomically."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def check_new_output(path: Path, overwrite: bool, what: str = "output file",
                     data: Path | None = None, ignore: tuple[str, ...] = (),
                     writes: tuple[str, ...] = ()) -> None:
    """Refuses to replace existing results unless asked to, and to write inside the data
    folder `data`; a folder holding only the names in `ignore` counts as empty.

    A folder output is replaced by --overwrite only when it holds what this command writes
    and nothing else: `writes` lists those names (glob patterns allowed). Another command's
    folder, or one it does not recognise, is refused, so --overwrite never deletes what this
    command did not write.

    Raises:
        ArtifactError: `path` holds something and `overwrite` is False, is the wrong kind,
            holds files this command did not write, or lies inside `data`.
    """
    check_name_length(path)  # before anything asks the file system about `path`
    if data is not None:
        check_outside(path, data, what, "data folder", "the next command reads a folder "
                      "there as a class and an image as a training image")
    is_dir_output = what.endswith(("directory", "folder"))
    if path.exists() and is_dir_output and not path.is_dir():
        raise ArtifactError(f"'{path}' is a file, not a {what}. Choose another -o/--output.")
    if path.exists() and not is_dir_output and path.is_dir():
        raise ArtifactError(f"'{path}' is a folder; --output needs a file name.")
    entries = [p.name for p in path.iterdir() if p.name not in ignore] if path.is_dir() else []
    occupied = path.exists() and (not path.is_dir() or bool(entries))
    check_writable(path)
    if occupied and not overwrite:
        raise ArtifactError(
            f"The {what} '{path}' already exists{' and is not empty' if is_dir_output else ''}. "
            f"Choose another name, or pass --overwrite to replace it.")
    if occupied and path.is_dir():
        foreign = sorted(name for name in entries if not _TEMP_NAME.match(name)
                         and not any(fnmatch.fnmatchcase(name, w) for w in writes))
        if foreign:
            shown = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more"
                                              if len(foreign) > 6 else "")
            raise ArtifactError(
                f"The folder '{path}' holds {len(foreign)} item(s) that this command did not "
                f"write ({shown}): it is not a {what}, and --overwrite replaces only one. "
                f"Nothing was deleted. Choose another -o/--output, or move those away first.")


def replace_path(source: Path, target: Path) -> None:
    """Puts a finished file or folder `source` where `target` is, on the same file system.
    An old folder there is renamed aside first and removed only once the new one is in place,
    so a reader sees the whole old one or the whole new one (a file is replaced by rename)."""
    aside = None
    if target.is_dir() and not target.is_symlink():
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.replace(target, aside / target.name)
    os.replace(source, target)
    if aside is not None:
        shutil.rmtree(aside)


def check_outside(path: Path, folder: Path, what: str, role: str, why: str) -> None:
    """Refuses an output inside an input folder (the data, a pool), where it would be read
    back as input.

    Raises:
        ArtifactError: naming the folder, what would go wrong, and the fix.
    """
    if _inside(path, folder):
        raise ArtifactError(
            f"The {what} '{path}' is inside the {role} '{folder}', where it would mix with "
            f"the images: {why}. Choose an -o/--output outside '{folder}'.")


def _inside(path: Path, folder: Path) -> bool:
    """`path` is `folder` or lies below it, links resolved."""
    inner, outer = path.resolve(), folder.resolve()
    return inner == outer or outer in inner.parents


def check_writable(path: Path, fix: str | None = None) -> None:
    """The folder `path` would be written in (its nearest existing one) accepts new files,
    so a read-only or forbidden output is refused before any work is done. `fix` says what
    to do instead.

    Raises:
        ArtifactError: naming the folder and the reason.
    """
    folder = path if path.is_dir() else path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ArtifactError(f"Cannot write into '{folder}' (read-only or not yours). " + (
            fix or "Choose another output, or change the folder's permissions."))
    try:  # what the folder really accepts (root passes os.access; /proc or a full disk do not)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".transferkit-probe."):
            pass
    except OSError as exc:
        raise _cannot_create(folder, exc, fix) from exc


def _cannot_create(folder: Path, exc: OSError, fix: str | None = None) -> ArtifactError:
    if fix is not None:
        reason = WRITE_ERRORS.get(exc.errno or 0, exc.strerror or str(exc))
        return ArtifactError(f"Could not create a file in '{folder}': {reason}. {fix}")
    return ArtifactError(describe_write_error(exc) or (
        f"Could not create a file in '{folder}' ({exc.strerror or exc}). Choose another "
        f"output."))


def check_name_length(path: Path) -> None:
    """Every name in `path` that would be created fits the file system, with room for the
    temporary name the file is written under first, so a long name is refused before any
    work rather than after it.

    Raises:
        ArtifactError: naming the part that is too long and the limit.
    """
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for i, part in enumerate(path.parts):
        size = len(os.fsencode(part))
        if i == len(path.parts) - 1:  # the file itself is first written under a longer name
            size += TEMP_OVERHEAD + len("".join(Path(part).suffixes))
        if size > limit:
            raise ArtifactError(
                f"The name '{part[:40]}...' is {len(os.fsencode(part))} bytes long; this file "
                f"system allows {limit} per name, and transferkit needs "
                f"{size - len(os.fsencode(part))} more for the temporary name it writes "
                f"under first. Choose a shorter name.")


def describe_write_error(exc: OSError) -> str | None:
    """One line for a write that failed for a reason the user can fix, else None."""
    reason = WRITE_ERRORS.get(exc.errno or 0)
    if reason is None:
        return None
    where = f" '{exc.filename}'" if exc.filename else ""
    fix = ("Free some space, or write to another disk." if exc.errno in (errno.ENOSPC,
                                                                        errno.EDQUOT)
           else "Choose a shorter name." if exc.errno == errno.ENAMETOOLONG
           else "Choose another output.")
    return f"Could not write{where}: {reason}. Nothing was left half-written. {fix}"


def remove_stale_temp_files(folder: Path) -> None:
    """Removes temp files that atomic_path left when its process was killed mid-write (only
    call it while holding the folder's lock, so that none is in use)."""
    if folder.is_dir():
        for path in folder.iterdir():
            if path.is_file() and _TEMP_NAME.match(path.name):
                path.unlink(missing_ok=True)
