"""The run directory: every file name in it, reading and writing run.json, splits.csv and the
history, the finished model, and the lock that makes one process its only writer. Nothing
else spells a run file's name or reads run.json.

A run directory describes itself: `model.keras` (raw RGB images in, class probabilities out;
built-in Keras layers only, no optimizer state), `run.json` (a RunRecord), `history.json`,
`history.csv` and `splits.csv`. Every file is written atomically. Reading validates what it
reads: run.json is plain JSON, nothing in it is evaluated, and models load in Keras's safe
mode.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import os
import platform
import shutil
import socket
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import transferkit
from transferkit.config import SAVEDMODEL_FILES
from transferkit.errors import ArtifactError, ConfigError, DataError, MissingPackageError
from transferkit.files import (
    atomic_path,
    check_new_output,
    describe_write_error,
    remove_stale_temp_files,
    restore_names,
    write_json,
    write_text,
)
from transferkit.runs.records import (
    COMPLETE,
    FAILED,
    INTERRUPTED,
    RUN_FORMAT,
    RUN_FORMAT_VERSION,
    RunRecord,
    Stopped,
)

if TYPE_CHECKING:
    from transferkit.data.folders import DataSplits
    from transferkit.reporting import Reporter

LOCK_FILE = ".transferkit.lock"  # held by the one process writing the run
MODEL_FILE = "model.keras"
RECORD_FILE = "run.json"
HISTORY_JSON = "history.json"
HISTORY_CSV = "history.csv"
SPLITS_FILE = "splits.csv"
CURVES_FILE = "curves.png"
LR_FIND_FILE = "lr_find.png"
TENSORBOARD_DIR = "tensorboard"
EVALUATION_DIR = "evaluation"
CHECKPOINTS_DIR = "checkpoints"
LAST_CHECKPOINT = "last.keras"
PREVIOUS_CHECKPOINT = "previous.keras"  # the epoch before the last, until the next settles it
STATE_FILE = "state.json"
HEAD_STATE = "head_state.npz"  # per-epoch checkpoint of a head trained on cached features
FOLDS_DIR = "folds"  # cv: one complete finetune run per fold
OOF_FILE = "oof.csv"  # cv: every image's out-of-fold prediction
REPORT_FILE = "report.html"  # the run's self-contained page (run_report.py); audit's too
NOVELTY_FILE = "novelty.npz"  # the kept model's "none of these" score (novelty.py)
# --unlabeled: the pool images a pool candidate labelled; the stages train on them too
PSEUDO_FILE = "pseudo_labels.csv"
RUN_FILES = (MODEL_FILE, RECORD_FILE, HISTORY_JSON, HISTORY_CSV, SPLITS_FILE, CHECKPOINTS_DIR,
             CURVES_FILE, LR_FIND_FILE, TENSORBOARD_DIR, EVALUATION_DIR, FOLDS_DIR, OOF_FILE,
             REPORT_FILE, NOVELTY_FILE, PSEUDO_FILE)
# What audit's and evaluate's folders hold: --overwrite replaces a folder of these alone
AUDIT_FILE = "audit.json"
AUDIT_FILES = (AUDIT_FILE, REPORT_FILE)
EVALUATION_FILES = ("metrics.json", "confusion.png", "mistakes.png")
# folder marker -> what the folder is, and the names its command writes in it
_OWNED = {RECORD_FILE: ("a transferkit run", RUN_FILES),
          AUDIT_FILE: ("an audit", AUDIT_FILES),
          EVALUATION_FILES[0]: ("an evaluation", EVALUATION_FILES),
          SAVEDMODEL_FILES[0]: ("a SavedModel export", SAVEDMODEL_FILES)}
HISTORY_COLUMNS = ("stage", "epoch", "loss", "accuracy", "val_loss", "val_accuracy",
                   "learning_rate", "seconds")


def versions() -> dict[str, str]:
    """Library versions to record with a run."""
    import keras
    import numpy as np
    import tensorflow as tf

    return {"transferkit": transferkit.__version__, "python": platform.python_version(),
            "tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__}


def save_record(run_dir: Path, record: RunRecord) -> RunRecord:
    """Writes run.json atomically, stamped with the time and library versions; returns the
    record as written."""
    record = record.replace(versions=versions(),
                            updated=datetime.now(UTC).isoformat(timespec="seconds"))
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / RECORD_FILE, record.to_dict())
    return record


def read_json(path: Path) -> Any:
    try:
        return restore_names(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"Could not read '{path}' ({exc}). The run directory is damaged; "
                            f"train it again.") from exc


def check_run_dir(run_dir: Path) -> None:
    """Raises an ArtifactError unless `run_dir` is a folder with a run.json."""
    if not run_dir.is_dir():
        raise ArtifactError(f"Run directory '{run_dir}' does not exist. Pass a folder written "
                            f"by `transferkit finetune`, `cv` or `extract --train-head`.")
    if not (run_dir / RECORD_FILE).is_file():
        raise ArtifactError(f"'{run_dir}' is not a transferkit run: it has no {RECORD_FILE}. "
                            f"Pass a folder written by `transferkit finetune`, `cv` or "
                            f"`extract --train-head`.")


def read_record(run_dir: Path, finished: bool = True) -> RunRecord:
    """run.json, validated. With `finished`, a run still running or interrupted is an error.

    Raises:
        ArtifactError: the folder is not a run, or run.json is damaged or of another version.
    """
    check_run_dir(run_dir)
    path = run_dir / RECORD_FILE
    values = read_json(path)
    if not isinstance(values, dict) or values.get("format") != RUN_FORMAT:
        raise ArtifactError(f"'{path}' is not a transferkit run description.")
    version = values.get("format_version")
    if version == 2:
        raise ArtifactError(
            f"'{run_dir}' was written by an earlier transferkit (run format 2). Bring its "
            f"run.json up to date, in place, with: transferkit upgrade {run_dir}")
    if version == 1:
        raise ArtifactError(
            f"'{run_dir}' was written by transferkit 0.1 (run format 1), whose model.keras "
            f"needs transferkit 0.1's own layer to load. Re-save it as a plain Keras run "
            f"with: transferkit upgrade {run_dir}")
    if version not in (3, RUN_FORMAT_VERSION):  # 3 is read as it is (RunRecord.from_dict)
        raise ArtifactError(
            f"'{run_dir}' was written in run format version {version!r}; this transferkit "
            f"({transferkit.__version__}) reads version {RUN_FORMAT_VERSION}. Use the "
            f"transferkit version that wrote it, or train the run again.")
    try:
        record = RunRecord.from_dict(values, version)
    except ConfigError as exc:
        raise ArtifactError(f"'{path}' is damaged: {str(exc).rstrip('.')}. Train the run "
                            f"again.") from exc
    if finished and record.status == FAILED:
        raise ArtifactError(f"'{run_dir}' holds a failed run: {record.failure}")
    if finished and record.status != COMPLETE:
        holder = lock_holder(run_dir)
        if holder is not None:
            raise ArtifactError(f"'{run_dir}' is still being written by another transferkit "
                                f"process ({holder}). Wait for it to finish.")
        raise ArtifactError(f"'{run_dir}' is an unfinished run ({describe_unfinished(record)})."
                            f" {how_to_continue(run_dir, record.command)}")
    return record


def how_to_continue(run_dir: Path, command: str = "finetune") -> str:
    """What to do with an unfinished run no process is writing: resume it from its
    checkpoint, or, when it stopped before its first one, resume it from the start."""
    if command == "cv":
        return (f"Continue it with `transferkit cv --resume {run_dir}`: finished folds are "
                f"kept, an interrupted one continues from its checkpoint.")
    if (run_dir / CHECKPOINTS_DIR / STATE_FILE).is_file():
        return (f"Continue it with `transferkit finetune --resume {run_dir}` (or start it "
                f"again with --overwrite).")
    return (f"It stopped before its first checkpoint: `transferkit finetune --resume {run_dir}` "
            f"starts it again with its saved settings (as --overwrite does with the options "
            f"given).")


_HELD: set[Path] = set()  # run directories this process holds the lock of


def _holder(fd: int) -> str:
    """What the lock's holder wrote into it: 'process N on HOST'."""
    return os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"


def _taken(run_dir: Path, holder: str) -> ArtifactError:
    return ArtifactError(f"'{run_dir}' is being written by another transferkit process "
                         f"({holder}). Two runs in one folder would mix their files: wait "
                         f"for it to finish, stop it, or choose another -o.")


def lock_holder(run_dir: Path) -> str | None:
    """Who else is writing `run_dir` now ('process N on HOST'), or None when no other
    process is."""
    if run_dir.resolve() in _HELD:
        return None
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(fd)
    finally:
        os.close(fd)  # closing releases a lock taken here
    return None


def how_it_ended(exc: BaseException, phase: str, where: tuple[str, int] | None = None
                 ) -> dict[str, Any]:
    """What run.json records of a run (finetune's, cv's) that `exc` ended in `phase`:
    interrupted, so that --resume continues, when its last checkpoint (`where`: stage and
    epoch) allows it or once the user has fixed the cause (a full disk, data gone or
    unreadable, a package missing); failed when the same settings would meet it again (a
    bug, damaged weights, a diverged training). With the reason either way."""
    reason = str(exc) or type(exc).__name__
    if where is not None:
        return {"status": INTERRUPTED, "failure": reason,
                "stopped": Stopped(stage=where[0], epoch=where[1])}
    if isinstance(exc, (DataError, MissingPackageError)) or (
            isinstance(exc, OSError) and describe_write_error(exc) is not None):
        return {"status": INTERRUPTED, "failure": reason, "stopped": Stopped(phase=phase)}
    return {"status": FAILED, "failure": reason}


def check_resumable(run_dir: Path, record: RunRecord, command: str) -> None:
    """`command --resume run_dir` can continue this run.

    Raises:
        ArtifactError: the run is another command's, complete, or failed for good; the
            message says what to do instead.
    """
    if record.command != command:
        instead = {"extract": "its classifier trains in seconds: run `transferkit extract "
                              "... --train-head` again, with --overwrite",
                   "cv": f"continue it with `transferkit cv --resume {run_dir}`",
                   "finetune": f"continue it with `transferkit finetune --resume {run_dir}`"}
        raise ArtifactError(f"'{run_dir}' was written by `transferkit {record.command}`, not "
                            f"`transferkit {command}`; {instead[record.command]}.")
    if record.status == COMPLETE:
        raise ArtifactError(f"'{run_dir}' is a complete run; there is nothing to resume. "
                            f"Start a new one with -o, or this one again with --overwrite.")
    if record.status == FAILED:
        raise ArtifactError(f"'{run_dir}' holds a run that failed ({record.failure}). Start it "
                            f"again with -o {run_dir} --overwrite.")


def describe_unfinished(record: RunRecord) -> str:
    """'interrupted in stage head after epoch 3', 'interrupted during the probe', or the
    bare status."""
    where, at = record.stopped, ""
    if where is not None:
        at = (f" in stage {where.stage} after epoch {where.epoch}" if where.stage
              else f" during {where.phase}")
    return record.status + at + (f" by an error: {record.failure}" if record.failure else "")


def check_output(path: Path, overwrite: bool, what: str = "output file", data: Path | None = None,
                 writes: tuple[str, ...] = ()) -> None:
    """files.check_new_output, and for a file: --overwrite never replaces a file that is part
    of what another command wrote (a run's run.json, an audit's report.html), as
    `predict -o RUN/run.json --overwrite` would.

    Raises:
        ArtifactError: see check_new_output; or the file belongs to another command's folder.
    """
    check_new_output(path, overwrite, what, data, writes=writes)
    if not path.is_file():
        return
    for marker, (kind, names) in _OWNED.items():
        if (path.parent / marker).is_file() and path.name in names:
            raise ArtifactError(
                f"'{path}' is part of {kind} in '{path.parent}', which this command did not "
                f"write: --overwrite replaces only its own outputs. Nothing was changed. "
                f"Choose another -o/--output.")


def check_run_output(path: Path, overwrite: bool, data: Path, command: str) -> None:
    """Refuses an occupied run directory unless `overwrite`, and one inside the data folder
    `data`; an unfinished run there gets a pointer to --resume. --overwrite replaces only a
    run of the same `command`.

    Raises:
        ArtifactError: `path` is a file, holds something and `overwrite` is False, holds
            another command's run or files no run writes, or lies inside `data`.
    """
    holder = lock_holder(path)
    if holder is not None:
        raise _taken(path, holder)
    if overwrite and (path / RECORD_FILE).is_file():
        try:
            other = read_json(path / RECORD_FILE).get("command", command)
        except (ArtifactError, AttributeError):
            other = command  # a damaged record: the run's own files are still all it holds
        if other != command:
            raise ArtifactError(
                f"'{path}' holds a `transferkit {other}` run, which `transferkit {command}` "
                f"did not write: --overwrite replaces only a {command} run. Nothing was "
                f"deleted. Choose another -o.")
    if not overwrite and (path / RECORD_FILE).is_file():
        try:
            record = read_record(path, finished=False)
        except ArtifactError:
            record = None
        if record is not None and record.status == FAILED:
            raise ArtifactError(
                f"The run directory '{path}' holds a failed run ({record.failure}). Pass "
                f"--overwrite to start again there.")
        if record is not None and record.status != COMPLETE:
            raise ArtifactError(
                f"The run directory '{path}' holds an unfinished run "
                f"({describe_unfinished(record)}). {how_to_continue(path, record.command)}")
    check_new_output(path, overwrite, what="run directory", ignore=(LOCK_FILE,), data=data,
                     writes=RUN_FILES)


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Makes this process the run directory's one writer while inside the block.

    The lock is an exclusive flock on RUN/.transferkit.lock, which the kernel releases when the
    holder exits, however it exits (kill -9 included): a lock left by a dead process is free
    to take, with nothing to clean up first. A folder the lock created is removed again if
    nothing else was written into it.

    Raises:
        ArtifactError: another process holds the lock; the message names it.
    """
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise _taken(run_dir, holder) from None
        try:  # the holder before us may have removed the file after we opened it
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}".encode(), 0)
    for folder in (run_dir, run_dir / CHECKPOINTS_DIR):  # left by a writer that was killed
        remove_stale_temp_files(folder)
    _HELD.add(run_dir.resolve())
    try:
        yield
    finally:
        _HELD.discard(run_dir.resolve())
        path.unlink(missing_ok=True)
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only if empty: a run that failed before writing anything


def clear_run(run_dir: Path) -> None:
    """Removes what an earlier run wrote into `run_dir` (for --overwrite); nothing else."""
    for name in RUN_FILES:
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)


def save_history(run_dir: Path, history: Sequence[Mapping[str, Any]]) -> None:
    """history.json, and history.csv with one row per epoch."""
    write_json(run_dir / HISTORY_JSON, list(history))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_text(run_dir / HISTORY_CSV, buffer.getvalue())


def save_splits(run_dir: Path, rows: Sequence[tuple[str, ...]]) -> None:
    """splits.csv: which file (relative path) had which label in which split; a cv run's rows
    add the fold that held each image out (empty for test)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(SPLITS_COLUMNS[:len(rows[0])] if rows else SPLITS_COLUMNS[:3])
    writer.writerows(rows)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / SPLITS_FILE, buffer.getvalue())


def save_pseudo_labels(run_dir: Path, sources: Sequence[str], labels: Sequence[str],
                       candidate: str) -> None:
    """PSEUDO_FILE: each pool image (the file decoded) with the class `candidate` gave it."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(PSEUDO_COLUMNS)
    writer.writerows((s, label, candidate) for s, label in zip(sources, labels, strict=True))
    write_text(run_dir / PSEUDO_FILE, buffer.getvalue())


def read_pseudo_labels(run_dir: Path, class_names: Sequence[str]
                       ) -> tuple[str | None, tuple[str, ...], np.ndarray]:
    """The candidate that wrote PSEUDO_FILE, its images and their labels (indices into
    `class_names`); (None, (), []) when the run has none.

    Raises:
        ArtifactError: the file is unreadable or a row is damaged.
    """
    path = run_dir / PSEUDO_FILE
    if not path.is_file():
        return None, (), np.zeros(0, np.int64)
    try:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            rows = list(csv.reader(f))
    except (OSError, csv.Error) as exc:
        raise ArtifactError(f"Could not read '{path}' ({exc}). Train the run again.") from exc
    index = {name: i for i, name in enumerate(class_names)}
    body = rows[1:]
    if not rows or tuple(rows[0]) != PSEUDO_COLUMNS or any(
            len(r) != 3 or not r[0] or r[1] not in index or r[2] != body[0][2] for r in body):
        raise ArtifactError(f"'{path}' is damaged: it needs the columns "
                            f"{', '.join(PSEUDO_COLUMNS)}, one of the run's classes in every "
                            f"row and one candidate. Train the run again.")
    return (body[0][2] if body else None, tuple(r[0] for r in body),
            np.array([index[r[1]] for r in body], np.int64))


PSEUDO_COLUMNS = ("source", "label", "candidate")
SPLITS_COLUMNS = ("path", "label", "split", "fold")
SPLITS = ("train", "val", "test")


def read_splits(run_dir: Path, class_names: Sequence[str]) -> list[dict[str, str]]:
    """The rows of splits.csv, each checked: a relative path inside the data folder, one of
    the run's classes, one of the splits.

    Raises:
        ArtifactError: the file is missing, unreadable, or a row is damaged.
    """
    path = run_dir / SPLITS_FILE
    try:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            rows = list(csv.DictReader(f))
    except OSError as exc:
        raise ArtifactError(f"Could not read '{path}' ({exc.strerror}).") from exc
    except csv.Error as exc:
        raise ArtifactError(f"'{path}' is damaged ({exc}); it is not the CSV transferkit "
                            f"wrote. Train the run again.") from exc
    known = set(class_names)
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        problem = None
        if tuple(row) not in (SPLITS_COLUMNS[:3], SPLITS_COLUMNS) or None in row.values():
            problem = "does not have the columns path, label, split (and a cv run's fold)"
        elif row["label"] not in known:
            problem = f"has label {row['label']!r}, which is not one of the run's classes"
        elif row["split"] not in SPLITS:
            problem = f"has split {row['split']!r}, not one of {', '.join(SPLITS)}"
        elif not row.get("fold", "1").isdigit() and row.get("fold") != "":
            problem = f"has fold {row['fold']!r}, not a fold number"
        elif not row["path"] or Path(row["path"]).is_absolute() or ".." in Path(
                row["path"]).parts:
            problem = f"has path {row['path']!r}, which is not inside the data folder"
        if problem:
            raise ArtifactError(f"'{path}' is damaged: line {number} {problem}. Train the run "
                                f"again.")
    return rows


def save_model(path: Path, model: Any) -> None:
    """Writes `model` for inference only: a fresh functional model over the same layers is
    saved, so no optimizer state goes with it (Keras's .keras format always saves a compiled
    model's optimizer)."""
    import keras

    plain = keras.Model(model.input, model.output, name=model.name)
    with atomic_path(path) as tmp:
        plain.save(tmp)


def save_run(run_dir: Path, model: Any, record: RunRecord,
             history: Sequence[Mapping[str, Any]]) -> RunRecord:
    """Writes the finished run: model.keras, the history, and run.json marked complete. The
    resume checkpoint is no longer needed; the best-of-stage checkpoints stay."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_model(run_dir / MODEL_FILE, model)
    save_history(run_dir, history)
    record = save_record(run_dir, record.replace(status=COMPLETE, stopped=None, failure=None))
    for name in (LAST_CHECKPOINT, PREVIOUS_CHECKPOINT, STATE_FILE, HEAD_STATE):
        (run_dir / CHECKPOINTS_DIR / name).unlink(missing_ok=True)
    return record


def load_keras_file(path: Path, fix: str, compile: bool = False) -> Any:
    """A .keras file of a run, loaded in Keras's safe mode (nothing in it runs).

    Raises:
        ArtifactError: it is missing, or damaged (truncated, overwritten, not a Keras
            archive), with `fix` as what to do.
    """
    import keras

    if not path.is_file():
        raise ArtifactError(f"'{path}' is missing. {fix}")
    if not zipfile.is_zipfile(path):  # Keras reports such a file as "not found"
        raise ArtifactError(f"'{path}' is damaged: it is not a Keras archive (truncated, or "
                            f"overwritten by something else). {fix}")
    try:
        return keras.saving.load_model(path, compile=compile, safe_mode=True)
    except (ValueError, TypeError, KeyError, OSError, zipfile.BadZipFile) as exc:
        raise ArtifactError(f"'{path}' is damaged and cannot be loaded ({exc}). {fix}") from exc


@dataclass(frozen=True)
class LoadedRun:
    """A finished run directory read back: its record and its model."""

    path: Path
    record: RunRecord
    model: Any

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.record.class_names

    @property
    def image_size(self) -> int:
        return self.record.image_size


def load_run(run_dir: Path) -> LoadedRun:
    """Reads a finished run directory. The model loads in Keras's safe mode.

    Raises:
        ArtifactError: files are missing, unreadable, or from an incompatible version.
    """

    record = read_record(run_dir)
    model_path = run_dir / MODEL_FILE
    if not model_path.is_file():
        raise ArtifactError(f"'{run_dir}' is a complete run, but its {MODEL_FILE} is gone "
                            f"(deleted or moved since). Put it back, or train the run again.")
    model = load_keras_file(model_path, "Train the run again.")
    if model.output_shape[-1] != len(record.class_names):
        raise ArtifactError(f"'{model_path}' predicts {model.output_shape[-1]} classes but "
                            f"{RECORD_FILE} names {len(record.class_names)}; the run directory "
                            f"is inconsistent.")
    if tuple(model.input_shape[1:3]) != (record.image_size, record.image_size):
        raise ArtifactError(f"'{model_path}' takes {model.input_shape[1]} px images but "
                            f"{RECORD_FILE} says {record.image_size}; the run directory is "
                            f"inconsistent.")
    return LoadedRun(run_dir, record, model)


def load_run_splits(run_dir: Path, record: RunRecord, reporter: Reporter) -> DataSplits:
    """The splits a run was trained on (splits.csv), read again from its data folder: the
    one reader of them, for resume, evaluate and export.

    Raises:
        ArtifactError: splits.csv is missing or damaged.
        DataError: the data folder or the run's images are gone.
    """
    from transferkit.data.folders import splits_from_table

    rows = read_splits(run_dir, record.class_names)
    return splits_from_table(record.data_dir, record.class_names, rows, reporter)


def seen_by_run(run_dir: Path, record: RunRecord, hashes: Sequence[str],
                reporter: Reporter) -> int:
    """How many of the content hashes `hashes` belong to an image the run trained on or
    chose its model with (its train and val splits, read again from its data folder; every
    image of a cv run outside test). A run whose splits cannot be read counts none, and
    says so."""
    from transferkit.reporting import NullReporter

    try:
        splits = load_run_splits(run_dir, record, NullReporter())
    except (DataError, ArtifactError) as exc:
        reporter.warning(f"Could not check whether these images were the run's own training "
                         f"images ({exc}).")
        return 0
    known = set(splits.train.hashes) | set(splits.val.hashes)
    return sum(h in known for h in hashes)

