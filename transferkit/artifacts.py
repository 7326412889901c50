"""The only place that writes or reads run directories, feature files and prediction files.

A run directory describes itself: `model.keras` (images in, probabilities out), `run.json`
(resolved config, classes, base, image size, preprocessing, metrics, versions, status),
`history.json` and `splits.csv`. While training, `checkpoints/` holds the last completed epoch
(with optimizer state, for `--resume`) and the best model of each stage. Every file is written
atomically, so an interrupted run never leaves half a file.
"""

from __future__ import annotations

import csv
import io
import json
import platform
import shutil
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

import transferkit
from transferkit.atomic import atomic_path, cache_dir, write_text
from transferkit.errors import ArtifactError

RUN_FORMAT = "transferkit-run"
RUN_FORMAT_VERSION = 1
FEATURES_FORMAT = "transferkit-features"
FEATURES_FORMAT_VERSION = 1
MODEL_FILE = "model.keras"
RUN_FILE = "run.json"
HISTORY_FILE = "history.json"
HISTORY_CSV = "history.csv"
SPLITS_FILE = "splits.csv"
CHECKPOINTS_DIR = "checkpoints"
LAST_CHECKPOINT = "last.keras"
STATE_FILE = "state.json"
RUN_FILES = (MODEL_FILE, RUN_FILE, HISTORY_FILE, HISTORY_CSV, SPLITS_FILE, CHECKPOINTS_DIR,
             "curves.png", "lr_find.png", "tensorboard")
COMPLETE, RUNNING, INTERRUPTED = "complete", "running", "interrupted"


def check_new_output(path: Path, overwrite: bool, what: str = "run directory") -> None:
    """Refuses to replace existing results unless asked to.

    Raises:
        ArtifactError: `path` holds something and `overwrite` is False, or is the wrong kind.
    """
    is_dir_output = what.endswith(("directory", "folder"))
    if path.exists() and is_dir_output and not path.is_dir():
        raise ArtifactError(f"'{path}' is a file, not a {what}. Choose another -o/--output.")
    if path.exists() and not is_dir_output and path.is_dir():
        raise ArtifactError(f"'{path}' is a folder; --output needs a file name.")
    occupied = path.exists() and (not path.is_dir() or any(path.iterdir()))
    if occupied and not overwrite and what == "run directory":
        status = _unfinished_status(path)
        if status is not None:
            raise ArtifactError(
                f"The run directory '{path}' holds an unfinished run ({status}). Continue it "
                f"with `transferkit finetune --resume {path}`, or pass --overwrite to start "
                f"again.")
    if occupied and not overwrite:
        raise ArtifactError(
            f"The {what} '{path}' already exists{' and is not empty' if is_dir_output else ''}. "
            f"Choose another name, or pass --overwrite to replace it.")


def _unfinished_status(run_dir: Path) -> str | None:
    """'interrupted in stage head after epoch 3', or None when not an unfinished run."""
    try:
        info = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(info, dict) or info.get("status") not in (RUNNING, INTERRUPTED):
        return None
    stopped = info.get("stopped") or {}
    where = (f" in stage {stopped.get('stage')} after epoch {stopped.get('epoch')}"
             if stopped else "")
    return f"{info['status']}{where}"


def clear_run(run_dir: Path) -> None:
    """Removes what an earlier run wrote into `run_dir` (for --overwrite); nothing else."""
    for name in RUN_FILES:
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)


def versions() -> dict[str, str]:
    """Library versions to record with a run."""
    import keras
    import tensorflow as tf

    return {"transferkit": transferkit.__version__, "python": platform.python_version(),
            "tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__}


def _json_text(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


def save_run_info(run_dir: Path, info: Mapping[str, Any]) -> None:
    """Writes run.json (format, versions and time stamp added)."""
    record = {"format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION,
              "updated": datetime.now(UTC).isoformat(timespec="seconds"),
              **info, "versions": versions()}
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / RUN_FILE, _json_text(record))


def save_run(run_dir: Path, model: Any, info: Mapping[str, Any],
             history: Sequence[Mapping[str, Any]]) -> None:
    """Writes the finished run: model.keras, history.json, and run.json marked complete.
    The resume checkpoint is no longer needed; the best-of-stage checkpoints stay."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(run_dir / MODEL_FILE) as tmp:
        model.save(tmp)
    save_history(run_dir, history)
    save_run_info(run_dir, {**info, "status": COMPLETE})
    for name in (LAST_CHECKPOINT, STATE_FILE):
        (run_dir / CHECKPOINTS_DIR / name).unlink(missing_ok=True)


HISTORY_COLUMNS = ("stage", "epoch", "loss", "accuracy", "val_loss", "val_accuracy",
                   "learning_rate")


def save_history(run_dir: Path, history: Sequence[Mapping[str, Any]]) -> None:
    """history.json, and history.csv with one row per epoch."""
    write_text(run_dir / HISTORY_FILE, _json_text(list(history)))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_text(run_dir / HISTORY_CSV, buffer.getvalue())


def save_figure(path: Path, figure: Any) -> None:
    """Writes a matplotlib figure as PNG, atomically, and frees it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)


def save_image(path: Path, pixels: np.ndarray, overwrite: bool = False) -> None:
    """Writes an RGB uint8 array as PNG, atomically; an existing file is kept unless asked."""
    from PIL import Image

    check_new_output(path, overwrite, what="output file")
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")


def best_checkpoint(run_dir: Path, stage: str) -> Path:
    """The best model of `stage` so far (written by save_checkpoint)."""
    return run_dir / CHECKPOINTS_DIR / f"best-{stage}.keras"


def restore_best(model: Any, run_dir: Path, stage: str) -> None:
    """Loads the weights of `stage`'s best checkpoint into `model` (not its optimizer)."""
    import warnings

    with warnings.catch_warnings():  # the optimizer may differ from the saved one: expected
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(best_checkpoint(run_dir, stage))


def save_splits(run_dir: Path, rows: Sequence[tuple[str, str, str]]) -> None:
    """splits.csv: which file (relative path) had which label in which split."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("path", "label", "split"))
    writer.writerows(rows)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / SPLITS_FILE, buffer.getvalue())


def read_splits(run_dir: Path) -> list[dict[str, str]]:
    """The rows of splits.csv."""
    try:
        with open(run_dir / SPLITS_FILE, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except OSError as exc:
        raise ArtifactError(f"Could not read '{run_dir / SPLITS_FILE}' ({exc.strerror}).") from exc


def save_checkpoint(run_dir: Path, model: Any, state: Mapping[str, Any]) -> None:
    """Saves the model after a completed epoch (optimizer state included), then the training
    state to resume from."""
    folder = run_dir / CHECKPOINTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / LAST_CHECKPOINT) as tmp:
        model.save(tmp)
    write_text(folder / STATE_FILE, _json_text(dict(state)))


def save_best(run_dir: Path, model: Any, stage: str) -> None:
    """Saves `model` as the best of `stage` so far."""
    (run_dir / CHECKPOINTS_DIR).mkdir(parents=True, exist_ok=True)
    with atomic_path(best_checkpoint(run_dir, stage)) as tmp:
        model.save(tmp)


def load_checkpoint(run_dir: Path) -> tuple[Any, dict[str, Any]]:
    """The last completed epoch's model (compiled, optimizer state restored) and state."""
    import keras

    import transferkit.layers  # noqa: F401  (registers the layers saved models refer to)

    folder = run_dir / CHECKPOINTS_DIR
    if not (folder / STATE_FILE).is_file() or not (folder / LAST_CHECKPOINT).is_file():
        raise ArtifactError(
            f"'{run_dir}' has no checkpoint to resume from: it stopped before finishing its "
            f"first epoch. Start it again with --overwrite.")
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        model = keras.saving.load_model(folder / LAST_CHECKPOINT, compile=True, safe_mode=True)
    except (OSError, ValueError, TypeError, KeyError, zipfile.BadZipFile) as exc:
        raise ArtifactError(f"Could not read the checkpoint in '{folder}' ({exc}). Start the "
                            f"run again with --overwrite.") from exc
    return model, state


@dataclass(frozen=True)
class LoadedRun:
    """A run directory read back: the model and what it says about itself."""

    path: Path
    model: Any
    info: dict[str, Any]
    class_names: tuple[str, ...]
    image_size: int


def read_run_info(run_dir: Path, finished: bool = True) -> dict[str, Any]:
    """run.json, validated (plain JSON: nothing in it is evaluated).

    With `finished`, a run that is still running or was interrupted is an error.
    """
    if not run_dir.is_dir():
        raise ArtifactError(f"Run directory '{run_dir}' does not exist. Pass a folder written "
                            f"by `transferkit finetune` or `transferkit extract --train-head`.")
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise ArtifactError(f"'{run_dir}' is not a transferkit run: it has no {RUN_FILE}. Pass "
                            f"a folder written by `transferkit finetune`.")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"Could not read '{path}' ({exc}). The run directory is damaged; "
                            f"train it again.") from exc
    if not isinstance(info, dict) or info.get("format") != RUN_FORMAT:
        raise ArtifactError(f"'{path}' is not a transferkit run description.")
    if info.get("format_version") != RUN_FORMAT_VERSION:
        raise ArtifactError(
            f"'{run_dir}' was written in run format version {info.get('format_version')!r}; "
            f"this transferkit ({transferkit.__version__}) reads version {RUN_FORMAT_VERSION}. "
            f"Use the transferkit version that wrote it, or train the run again.")
    names = info.get("class_names")
    if not (isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) for n in names)):
        raise ArtifactError(f"'{path}' has no valid class_names list (got {names!r}); cannot "
                            f"name predictions. Train the run again.")
    size = info.get("image_size")
    if not (isinstance(size, int) and size > 0):
        raise ArtifactError(f"'{path}' has no valid image_size (got {size!r}).")
    pre = info.get("preprocessing")
    if not (isinstance(pre, dict) and pre.get("channel_order") in ("rgb", "bgr")
            and all(isinstance(pre.get(k), list) and len(pre[k]) == 3 for k in ("mean", "std"))):
        raise ArtifactError(f"'{path}' has no valid preprocessing description (got {pre!r}); "
                            f"cannot tell how images were scaled. Train the run again.")
    if finished and info.get("status", COMPLETE) != COMPLETE:
        raise ArtifactError(
            f"'{run_dir}' is an unfinished run ({_unfinished_status(run_dir)}). Finish it with "
            f"`transferkit finetune --resume {run_dir}` first.")
    return info


def load_run(run_dir: Path) -> LoadedRun:
    """Reads a run directory. The model loads in Keras's safe mode: no code from the file runs.

    Raises:
        ArtifactError: files are missing, unreadable, or from an incompatible version.
    """
    import keras

    import transferkit.layers  # noqa: F401  (registers the layers saved models refer to)

    info = read_run_info(run_dir)
    model_path = run_dir / MODEL_FILE
    if not model_path.is_file():
        raise ArtifactError(f"'{run_dir}' has no {MODEL_FILE}; the run did not finish. Train "
                            f"it again.")
    try:
        model = keras.saving.load_model(model_path, compile=False, safe_mode=True)
    except (ValueError, TypeError, KeyError, OSError, zipfile.BadZipFile) as exc:
        raise ArtifactError(f"Could not load '{model_path}' ({exc}).") from exc
    class_names = tuple(info["class_names"])
    if model.output_shape[-1] != len(class_names):
        raise ArtifactError(f"'{model_path}' predicts {model.output_shape[-1]} classes but "
                            f"run.json names {len(class_names)}; the run directory is "
                            f"inconsistent.")
    return LoadedRun(run_dir, model, info, class_names, int(info["image_size"]))


@dataclass(frozen=True)
class FeatureSet:
    """Features of every image of a data folder, with labels, splits and relative paths."""

    features: np.ndarray  # (n, feature_dim) float32
    labels: np.ndarray  # (n,) int32 into class_names
    splits: np.ndarray  # (n,) str: train | val | test
    paths: np.ndarray  # (n,) str, relative to the data folder
    class_names: tuple[str, ...]
    meta: dict[str, Any]

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        mask = self.splits == name
        return self.features[mask], self.labels[mask]


def save_features(path: Path, features: FeatureSet, overwrite: bool = False) -> None:
    """Writes a FeatureSet as .npz: plain arrays and a JSON string, no pickles."""
    check_new_output(path, overwrite, what="feature file")
    meta = {"format": FEATURES_FORMAT, "format_version": FEATURES_FORMAT_VERSION,
            **features.meta, "class_names": list(features.class_names)}
    with atomic_path(path) as tmp:
        np.savez(tmp, features=features.features.astype(np.float32),
                 labels=features.labels.astype(np.int32),
                 splits=features.splits.astype(str), paths=features.paths.astype(str),
                 meta=np.array(json.dumps(meta)))


def load_features(path: Path) -> FeatureSet:
    """Reads a feature file written by save_features (allow_pickle stays off)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
            arrays = {k: npz[k] for k in ("features", "labels", "splits", "paths")}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise ArtifactError(f"Could not read feature file '{path}' ({exc}). Run `transferkit "
                            f"extract` again.") from exc
    if meta.get("format") != FEATURES_FORMAT:
        raise ArtifactError(f"'{path}' is not a transferkit feature file.")
    return FeatureSet(class_names=tuple(meta.pop("class_names")), meta=meta, **arrays)


class FeatureCache:
    """Features already computed for one extractor (base, weights, size, cut point, pooling,
    preprocessing), by image content hash: one .npz of plain arrays per extractor."""

    def __init__(self, key: str) -> None:
        self.path = cache_dir() / "features" / f"{key}.npz"
        self.index: dict[str, int] = {}
        self.rows: list[np.ndarray] = []
        self.changed = False
        try:
            with np.load(self.path, allow_pickle=False) as npz:
                features = npz["features"]
                self.index = {str(h): i for i, h in enumerate(npz["hashes"])}
                self.rows = list(features)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # no cache yet, or a damaged one: start afresh

    def get(self, content_hash: str) -> np.ndarray | None:
        i = self.index.get(content_hash)
        return None if i is None else self.rows[i]

    def put(self, hashes: Sequence[str], features: np.ndarray) -> None:
        for h, row in zip(hashes, features, strict=True):
            if h not in self.index:
                self.index[h] = len(self.rows)
                self.rows.append(row)
                self.changed = True

    def save(self) -> None:
        if not self.changed:
            return
        hashes = np.array(sorted(self.index, key=self.index.__getitem__))
        with atomic_path(self.path) as tmp:
            np.savez(tmp, hashes=hashes, features=np.stack(self.rows).astype(np.float32))


def cache_usage() -> dict[str, tuple[int, int]]:
    """Files and bytes in each part of the cache folder."""
    usage = {}
    for part in ("features", "converted", "weights"):
        files = [f for f in (cache_dir() / part).rglob("*") if f.is_file()]
        usage[part] = (len(files), sum(f.stat().st_size for f in files))
    return usage


def clear_cache(parts: Sequence[str] = ("features", "converted")) -> None:
    """Removes cached features and converted images (they are rebuilt when needed). The
    converted ImageNet weights stay unless named."""
    for part in parts:
        shutil.rmtree(cache_dir() / part, ignore_errors=True)
    if "converted" in parts:  # the inspection memo points at converted copies
        (cache_dir() / "inspected.json").unlink(missing_ok=True)


def save_report(path: Path, report: Mapping[str, Any], overwrite: bool = False) -> None:
    """Writes a JSON report (e.g. from `doctor`)."""
    check_new_output(path, overwrite, what="output file")
    write_text(path, _json_text(dict(report)))


PREDICTION_FIELDS = ("path", "label", "probability", "true_label", "error")
OPTIONAL_PREDICTION_FIELDS = ("best_guess",)  # written only by --threshold


def save_predictions(path: Path, rows: Sequence[Mapping[str, Any]], top_k: int,
                     overwrite: bool = False) -> None:
    """Writes prediction rows as CSV (top-k as label_N/probability_N columns), JSON, or JSON
    Lines (one object per line)."""
    check_new_output(path, overwrite, what="output file")
    if path.suffix.lower() == ".json":
        write_text(path, _json_text(list(rows)))
        return
    if path.suffix.lower() == ".jsonl":
        write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        return
    extra = [f"{kind}_{k}" for k in range(2, top_k + 1) for kind in ("label", "probability")]
    extra += [f for f in OPTIONAL_PREDICTION_FIELDS if any(f in row for row in rows)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=[*PREDICTION_FIELDS, *extra],
                            extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        flat = {k: row.get(k) for k in (*PREDICTION_FIELDS, *OPTIONAL_PREDICTION_FIELDS)}
        for k, alt in enumerate(row.get("top_k", [])[1:], start=2):
            flat[f"label_{k}"], flat[f"probability_{k}"] = alt["label"], alt["probability"]
        writer.writerow(flat)
    write_text(path, buffer.getvalue())
