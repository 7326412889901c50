"""The run directory: every file name in it, the typed run record (run.json), and reading and
writing them. Nothing else spells a run file's name or reads run.json.

A run directory describes itself: `model.keras` (raw RGB images in, class probabilities out;
built-in Keras layers only, no optimizer state), `run.json` (a RunRecord), `history.json`,
`history.csv` and `splits.csv`. While training, `checkpoints/` holds the last completed epoch
(with optimizer state, for `--resume`) and the best model of each stage. Every file is written
atomically. Reading validates what it reads: run.json is plain JSON, nothing in it is
evaluated, and models load in Keras's safe mode.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import io
import json
import os
import platform
import shutil
import socket
import warnings
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import transferkit
from transferkit.bases import Preprocessing
from transferkit.config import ExtractConfig, FinetuneConfig, from_dict, to_dict
from transferkit.errors import ArtifactError, ConfigError
from transferkit.files import (
    atomic_path,
    check_new_output,
    json_text,
    remove_stale_temp_files,
    write_json,
    write_text,
)
from transferkit.reporting import fits_one_line
from transferkit.stats import wilson_interval

RUN_FORMAT = "transferkit-run"
LOCK_FILE = ".transferkit.lock"  # held by the one process writing the run
RUN_FORMAT_VERSION = 2
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
STATE_FILE = "state.json"
HEAD_STATE = "head_state.npz"  # per-epoch checkpoint of a head trained on cached features
FOLDS_DIR = "folds"  # cv: one complete finetune run per fold
OOF_FILE = "oof.csv"  # cv: every image's out-of-fold prediction
REPORT_FILE = "report.html"  # the run's self-contained page (run_report.py); audit's too
RUN_FILES = (MODEL_FILE, RECORD_FILE, HISTORY_JSON, HISTORY_CSV, SPLITS_FILE, CHECKPOINTS_DIR,
             CURVES_FILE, LR_FIND_FILE, TENSORBOARD_DIR, EVALUATION_DIR, FOLDS_DIR, OOF_FILE,
             REPORT_FILE)
COMPLETE, RUNNING, INTERRUPTED, FAILED = "complete", "running", "interrupted", "failed"
STATUSES = (COMPLETE, RUNNING, INTERRUPTED, FAILED)
# command -> its config; a cv run records the recipe each of its folds ran
COMMANDS = {"finetune": FinetuneConfig, "extract": ExtractConfig, "cv": FinetuneConfig}
HISTORY_COLUMNS = ("stage", "epoch", "loss", "accuracy", "val_loss", "val_accuracy",
                   "learning_rate", "seconds")


@dataclass(frozen=True, kw_only=True)
class StageResult:
    """What one training stage did, and the epoch it kept (its best, restored at the end)."""

    name: str
    epochs: int  # run
    learning_rate: float
    trainable_params: int
    metrics: dict[str, float]  # of the kept epoch
    best_epoch: int | None
    best_val_accuracy: float | None
    stopped_early: bool = False


@dataclass(frozen=True, kw_only=True)
class Score:
    """An accuracy with its split, its n and its 95 % Wilson interval; `chose` says the split
    chose epochs or stages, which makes its accuracy an optimistic estimate."""

    split: str
    n: int
    correct: int
    accuracy: float
    low: float
    high: float
    chose: bool

    @classmethod
    def of(cls, split: str, correct: int, n: int, chose: bool) -> Score:
        low, high = wilson_interval(correct, n)
        return cls(split=split, n=n, correct=correct, accuracy=correct / n if n else 0.0,
                   low=low, high=high, chose=chose)

    def describe(self) -> str:
        """'val accuracy 0.895 (95 % CI 0.759-0.958, n=38)'."""
        return (f"{self.split} accuracy {self.accuracy:.3f} (95 % CI {self.low:.3f}-"
                f"{self.high:.3f}, n={self.n})")


@dataclass(frozen=True, kw_only=True)
class ProbeRecord:
    """The linear probe a finetune began with: its regularisation, how it was chosen, and
    when it was ready as a model (seconds after the run started)."""

    c: float
    folds: int  # of the cross-validation that chose c; 0: not cross-validated
    fit_seconds: float
    ready_after: float


@dataclass(frozen=True, kw_only=True)
class Adaptation:
    """What finetune found about the data before its stages (training.adaptation): the
    out-of-fold accuracy on train of raw pixels, of the linear probe, and of raw pixels on
    the held-out images mirrored; and what it made of them."""

    folds: int
    images: int  # training images checked (a stratified sample of large sets)
    pixel_accuracy: float
    probe_accuracy: float
    mirrored_accuracy: float
    deep: bool  # the features fit the data badly: every block is fine-tuned
    mirror_changes_labels: bool  # left-right flips are left out of the augmentation
    seconds: float


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """One step of choosing the kept model: `other` replaces `simpler` only when it gets
    more validation images right by more than the noise of that count."""

    simpler: str
    other: str
    margin: int  # images `other` gets right minus those `simpler` does, on the same images
    noise: float  # sqrt of the images on which they disagree (McNemar)
    won: bool


@dataclass(frozen=True, kw_only=True)
class Choice:
    """How the kept model was chosen among the candidates (simplest first)."""

    val_correct: dict[str, int]  # candidate -> validation images it gets right
    n: int
    comparisons: tuple[Comparison, ...]
    kept: str


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """Temperature scaling fitted on val, with the expected calibration error (ECE) before
    and after, on val (which fitted it) and on test when there is one."""

    temperature: float
    val_ece_before: float
    val_ece_after: float
    test_ece_before: float | None = None
    test_ece_after: float | None = None


@dataclass(frozen=True, kw_only=True)
class CrossValidation:
    """A cv run: stratified K-fold cross-validation of the recipe. Each fold chose its
    epochs and candidates on an inner val split of its training folds, so every fold's
    score (on the fold it never saw) is held out."""

    folds: int
    fold_scores: tuple[Score, ...]
    mean: float  # of the fold accuracies
    sd: float


@dataclass(frozen=True, kw_only=True)
class Compute:
    """How the hardware was used (resolved, not as asked)."""

    precision: str = "float32"  # float32 | mixed
    jit: bool = False
    strategy: str = "none"  # the tf.distribute strategy's class name, or none
    replicas: int = 1


@dataclass(frozen=True, kw_only=True)
class SkippedRecord:
    path: str  # as found, relative or absolute
    reason: str


@dataclass(frozen=True, kw_only=True)
class DataSummary:
    """What the run saw of its data folder."""

    presplit: bool
    counts: dict[str, dict[str, int]]  # split -> class -> images
    converted: int  # images read through a plain RGB copy
    skipped: tuple[SkippedRecord, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Stopped:
    """Where an interrupted run stopped."""

    stage: str
    epoch: int
    signal: str


@dataclass(frozen=True, kw_only=True)
class LRFind:
    """The learning-rate range test a run started with."""

    learning_rates: tuple[float, ...]
    losses: tuple[float, ...]
    suggestion: float
    rule: str  # how the suggestion was picked
    at_edge: bool  # the lowest loss sat at the top of the range tried


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    """run.json: everything a run directory says about itself. `config` is resolved: its
    image size is the one used (the only place the image size is stored)."""

    command: str  # finetune | extract | cv
    config: FinetuneConfig | ExtractConfig
    base: str
    base_layer: str  # the base's layer name inside the model's `features` model
    preprocessing: Preprocessing
    class_names: tuple[str, ...]
    class_weights: dict[str, float] | None = None
    compute: Compute = field(default_factory=Compute)
    data: DataSummary
    status: str = RUNNING
    trainable_params: dict[str, int] = field(default_factory=dict)  # per stage
    stages: tuple[StageResult, ...] = ()
    kept_stage: str | None = None  # whose weights model.keras has
    metrics: dict[str, float] = field(default_factory=dict)  # of the kept stage's best epoch
    scores: tuple[Score, ...] = ()  # the kept model's accuracy per split, with intervals
    lr_find: LRFind | None = None
    probe: ProbeRecord | None = None
    adaptation: Adaptation | None = None
    choice: Choice | None = None
    calibration: Calibration | None = None
    cross_validation: CrossValidation | None = None
    stopped: Stopped | None = None
    failure: str | None = None  # why a failed run stopped
    versions: dict[str, str] = field(default_factory=dict)  # set when saved
    updated: str = ""  # set when saved

    @property
    def image_size(self) -> int:
        size = self.config.data.image_size
        assert size is not None  # a record's config is resolved
        return size

    @property
    def data_dir(self) -> Path:
        return Path(self.config.data.data_dir)

    @property
    def rollback(self) -> bool:
        """Whether the kept model is an earlier stage's than the last one run."""
        return bool(self.stages) and self.kept_stage != self.stages[-1].name

    def replace(self, **changes: Any) -> RunRecord:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["config"] = to_dict(self.config)
        plain = json.loads(json.dumps(values, default=_plain))
        return {"format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION, **plain}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RunRecord:
        """A record from run.json's content, validated.

        Raises:
            ConfigError: a missing or invalid field (the caller names the file).
        """
        values = {k: v for k, v in values.items() if k not in ("format", "format_version")}
        command = values.get("command")
        if command not in COMMANDS:
            raise ConfigError(f"unknown command {command!r}")
        config = values.get("config")
        if not isinstance(config, Mapping):
            raise ConfigError(f"config must be a table of settings; got {config!r}")
        config = from_dict(COMMANDS[command], config, prefix="config.")
        record = from_dict(cls, values, ready={"config": config})
        if config.data.image_size is None:
            raise ConfigError("config.data.image_size is not set")
        names = record.class_names
        if len(names) < 2 or len(set(names)) != len(names) or not all(
                isinstance(n, str) and fits_one_line(n) for n in names):
            raise ConfigError(f"class_names must be two or more distinct names without line "
                              f"breaks or control characters; got {names!r}")
        if record.status not in STATUSES:
            raise ConfigError(f"status must be one of {', '.join(STATUSES)}; got "
                              f"{record.status!r}")
        pre = record.preprocessing
        if pre.channel_order not in ("rgb", "bgr") or len(pre.mean) != 3 or len(pre.std) != 3:
            raise ConfigError(f"invalid preprocessing {pre!r}")
        return record


def _plain(value: Any) -> Any:
    """JSON for what json does not know: dataclasses, paths, tuples."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to run.json")


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


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"Could not read '{path}' ({exc}). The run directory is damaged; "
                            f"train it again.") from exc


def read_record(run_dir: Path, finished: bool = True) -> RunRecord:
    """run.json, validated. With `finished`, a run still running or interrupted is an error.

    Raises:
        ArtifactError: the folder is not a run, or run.json is damaged or of another version.
    """
    if not run_dir.is_dir():
        raise ArtifactError(f"Run directory '{run_dir}' does not exist. Pass a folder written "
                            f"by `transferkit finetune` or `transferkit extract --train-head`.")
    path = run_dir / RECORD_FILE
    if not path.is_file():
        raise ArtifactError(f"'{run_dir}' is not a transferkit run: it has no {RECORD_FILE}. "
                            f"Pass a folder written by `transferkit finetune`.")
    values = _read_json(path)
    if not isinstance(values, dict) or values.get("format") != RUN_FORMAT:
        raise ArtifactError(f"'{path}' is not a transferkit run description.")
    version = values.get("format_version")
    if version == 1:
        raise ArtifactError(
            f"'{run_dir}' was written by transferkit 0.1 (run format 1), whose model.keras "
            f"needs transferkit 0.1's own layer to load. Re-save it as a plain Keras run "
            f"(format 2) with: transferkit upgrade {run_dir}")
    if version != RUN_FORMAT_VERSION:
        raise ArtifactError(
            f"'{run_dir}' was written in run format version {version!r}; this transferkit "
            f"({transferkit.__version__}) reads version {RUN_FORMAT_VERSION}. Use the "
            f"transferkit version that wrote it, or train the run again.")
    try:
        record = RunRecord.from_dict(values)
    except ConfigError as exc:
        raise ArtifactError(f"'{path}' is damaged: {exc}. Train the run again.") from exc
    if finished and record.status == FAILED:
        raise ArtifactError(f"'{run_dir}' holds a failed run: {record.failure}")
    if finished and record.status != COMPLETE:
        raise ArtifactError(
            f"'{run_dir}' is an unfinished run ({describe_unfinished(record)}). Finish it with "
            f"`transferkit finetune --resume {run_dir}` first.")
    return record


def describe_unfinished(record: RunRecord) -> str:
    """'interrupted in stage head after epoch 3', or the bare status."""
    where = record.stopped
    return record.status + (f" in stage {where.stage} after epoch {where.epoch}" if where
                            else "")


def check_run_output(path: Path, overwrite: bool) -> None:
    """Refuses an occupied run directory unless `overwrite`; an unfinished run there gets
    a pointer to --resume.

    Raises:
        ArtifactError: `path` is a file, or holds something and `overwrite` is False.
    """
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
                f"({describe_unfinished(record)}). Continue it with `transferkit finetune "
                f"--resume {path}`, or pass --overwrite to start again.")
    check_new_output(path, overwrite, what="run directory", ignore=(LOCK_FILE,))


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
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise ArtifactError(
                f"'{run_dir}' is being written by another transferkit process ({holder}). "
                f"Two runs in one folder would mix their files: wait for it to finish, stop "
                f"it, or choose another -o.") from None
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
    try:
        yield
    finally:
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


def save_splits(run_dir: Path, rows: Sequence[tuple[str, str, str]]) -> None:
    """splits.csv: which file (relative path) had which label in which split."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("path", "label", "split"))
    writer.writerows(rows)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / SPLITS_FILE, buffer.getvalue())


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
        if set(row) != {"path", "label", "split"} or None in row.values():
            problem = "does not have the columns path, label, split"
        elif row["label"] not in known:
            problem = f"has label {row['label']!r}, which is not one of the run's classes"
        elif row["split"] not in SPLITS:
            problem = f"has split {row['split']!r}, not one of {', '.join(SPLITS)}"
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
    record = save_record(run_dir, record.replace(status=COMPLETE, stopped=None))
    for name in (LAST_CHECKPOINT, STATE_FILE, HEAD_STATE):
        (run_dir / CHECKPOINTS_DIR / name).unlink(missing_ok=True)
    return record


def best_checkpoint(run_dir: Path, stage: str) -> Path:
    """The best model of `stage` so far (written by save_best)."""
    return run_dir / CHECKPOINTS_DIR / f"best-{stage}.keras"


def restore_best(model: Any, run_dir: Path, stage: str) -> None:
    """Loads the weights of `stage`'s best checkpoint into `model` (not its optimizer)."""
    with warnings.catch_warnings():  # the optimizer may differ from the saved one: expected
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(best_checkpoint(run_dir, stage))


def save_checkpoint(run_dir: Path, model: Any, state: Mapping[str, Any] | None = None) -> None:
    """Saves the model (optimizer state included) as the checkpoint to resume from, then the
    training state (stage, epoch, history) that says so; without `state`, the model alone
    (the base of head-only checkpoints, saved when their stage starts)."""
    folder = run_dir / CHECKPOINTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / LAST_CHECKPOINT) as tmp:
        model.save(tmp)
    (folder / HEAD_STATE).unlink(missing_ok=True)
    if state is not None:
        write_text(folder / STATE_FILE, json_text(dict(state)))


def save_head_state(run_dir: Path, last: Sequence[Any], best: Sequence[Any] | None,
                    optimizer: Sequence[Any], state: Mapping[str, Any]) -> None:
    """A head-only checkpoint: the head's weights, its best weights so far and the optimizer
    state, as plain arrays, then the training state that points at it."""
    import numpy as np

    folder = run_dir / CHECKPOINTS_DIR
    arrays = {f"last_{i}": w for i, w in enumerate(last)}
    arrays |= {f"best_{i}": w for i, w in enumerate(best or [])}
    arrays |= {f"optimizer_{i}": v for i, v in enumerate(optimizer)}
    with atomic_path(folder / HEAD_STATE) as tmp:
        np.savez(tmp, **arrays)
    write_text(folder / STATE_FILE, json_text({**state, "head_only": True}))


def keep_last_as_best(run_dir: Path, stage: str) -> None:
    """Makes the checkpoint just written `stage`'s best so far, by copying the file (a save
    of the same model again would cost as much as the checkpoint itself)."""
    with atomic_path(best_checkpoint(run_dir, stage)) as tmp:
        shutil.copyfile(run_dir / CHECKPOINTS_DIR / LAST_CHECKPOINT, tmp)


def load_head_state(run_dir: Path) -> tuple[list[Any], list[Any] | None, list[Any]]:
    """The head's last weights, its best so far (None if none) and the optimizer state.

    Raises:
        ArtifactError: the file is missing or damaged.
    """
    import numpy as np

    path = run_dir / CHECKPOINTS_DIR / HEAD_STATE
    try:
        with np.load(path, allow_pickle=False) as npz:
            def group(prefix: str) -> list[Any]:
                keys = sorted((k for k in npz.files if k.startswith(prefix)),
                              key=lambda k: int(k.rsplit("_", 1)[1]))
                return [npz[k] for k in keys]

            last, best, optimizer = group("last_"), group("best_"), group("optimizer_")
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ArtifactError(f"Could not read '{path}' ({exc}). Start the run again with "
                            f"--overwrite.") from exc
    if not last:
        raise ArtifactError(f"'{path}' holds no head weights. Start the run again with "
                            f"--overwrite.")
    return last, best or None, optimizer


def save_best(run_dir: Path, model: Any, stage: str) -> None:
    """Saves `model` as the best of `stage` so far."""
    (run_dir / CHECKPOINTS_DIR).mkdir(parents=True, exist_ok=True)
    with atomic_path(best_checkpoint(run_dir, stage)) as tmp:
        model.save(tmp)


def load_checkpoint(run_dir: Path, stages: Sequence[str]) -> tuple[Any, dict[str, Any]]:
    """The last completed epoch's model (compiled, optimizer state restored) and the state
    to resume from (its stage, one of `stages`; its epoch; the history so far), checked.

    Raises:
        ArtifactError: there is no checkpoint yet, or it is damaged.
    """
    import keras

    folder = run_dir / CHECKPOINTS_DIR
    if not (folder / STATE_FILE).is_file() or not (folder / LAST_CHECKPOINT).is_file():
        raise ArtifactError(
            f"'{run_dir}' has no checkpoint to resume from: it stopped before finishing its "
            f"first epoch. Start it again with --overwrite.")
    state = _read_json(folder / STATE_FILE)
    history = state.get("history") if isinstance(state, dict) else None
    valid = (isinstance(state, dict) and state.get("stage") in stages
             and isinstance(state.get("epoch"), int) and state["epoch"] >= 1
             and isinstance(history, list) and bool(history)
             and all(isinstance(r, dict) and isinstance(r.get("epoch"), int) for r in history)
             and history[-1]["epoch"] == state["epoch"])
    if not valid:
        raise ArtifactError(f"'{folder / STATE_FILE}' is damaged (it needs the stage, the "
                            f"epoch and the history of every epoch so far). Start the run "
                            f"again with --overwrite.")
    try:
        with warnings.catch_warnings():  # a head-only checkpoint's optimizer state is its own
            warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            model = keras.saving.load_model(folder / LAST_CHECKPOINT, compile=True,
                                            safe_mode=True)
    except (OSError, ValueError, TypeError, KeyError, zipfile.BadZipFile) as exc:
        raise ArtifactError(f"Could not read the checkpoint in '{folder}' ({exc}). Start the "
                            f"run again with --overwrite.") from exc
    return model, state


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
    import keras

    record = read_record(run_dir)
    model_path = run_dir / MODEL_FILE
    if not model_path.is_file():
        raise ArtifactError(f"'{run_dir}' has no {MODEL_FILE}; the run did not finish. Train "
                            f"it again.")
    try:
        model = keras.saving.load_model(model_path, compile=False, safe_mode=True)
    except (ValueError, TypeError, KeyError, OSError, zipfile.BadZipFile) as exc:
        raise ArtifactError(f"Could not load '{model_path}' ({exc}).") from exc
    if model.output_shape[-1] != len(record.class_names):
        raise ArtifactError(f"'{model_path}' predicts {model.output_shape[-1]} classes but "
                            f"{RECORD_FILE} names {len(record.class_names)}; the run directory "
                            f"is inconsistent.")
    if tuple(model.input_shape[1:3]) != (record.image_size, record.image_size):
        raise ArtifactError(f"'{model_path}' takes {model.input_shape[1]} px images but "
                            f"{RECORD_FILE} says {record.image_size}; the run directory is "
                            f"inconsistent.")
    return LoadedRun(run_dir, record, model)
