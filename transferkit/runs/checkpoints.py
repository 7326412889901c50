"""Checkpoints inside a run directory while it trains: the last completed epoch with its
optimizer state (for --resume), a head-only epoch as plain arrays, and each stage's best
model. Keras saves and loads them (safe mode); this module names and validates them.
"""

from __future__ import annotations

import os
import shutil
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transferkit.errors import ArtifactError
from transferkit.files import atomic_path, json_text, npz_problem, write_text
from transferkit.runs.directory import (
    CHECKPOINTS_DIR,
    HEAD_STATE,
    LAST_CHECKPOINT,
    PREVIOUS_CHECKPOINT,
    STATE_FILE,
    load_keras_file,
    read_json,
)


def best_checkpoint(run_dir: Path, stage: str) -> Path:
    """The best model of `stage` so far (written by save_best)."""
    return run_dir / CHECKPOINTS_DIR / f"best-{stage}.keras"


def restore_best(model: Any, run_dir: Path, stage: str) -> None:
    """Loads the weights of `stage`'s best checkpoint into `model` (not its optimizer)."""
    with warnings.catch_warnings():  # the optimizer may differ from the saved one: expected
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model.load_weights(best_checkpoint(run_dir, stage))


def save_checkpoint(run_dir: Path, model: Any, state: Mapping[str, Any] | None = None,
                    keep_previous: bool = False) -> None:
    """Saves the model (optimizer state included) as the checkpoint to resume from, then the
    training state (stage, epoch, history) that says so; without `state`, the model alone
    (the base of head-only checkpoints, saved when their stage starts). `keep_previous`
    keeps the checkpoint it replaces as PREVIOUS_CHECKPOINT: a hard link (a copy where the
    file system has none), so the last checkpoint is on disk at every moment."""
    folder = run_dir / CHECKPOINTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    last = folder / LAST_CHECKPOINT
    if keep_previous and last.is_file():
        with atomic_path(folder / PREVIOUS_CHECKPOINT) as tmp:
            tmp.unlink()
            try:
                os.link(last, tmp)
            except OSError:
                shutil.copyfile(last, tmp)
    with atomic_path(last) as tmp:
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


def keep_as_best(run_dir: Path, stage: str, previous: bool) -> None:
    """Makes the checkpoint just written (or, with `previous`, the one before it) `stage`'s
    best so far, by copying the file (a save of the same model again would cost as much as
    the checkpoint itself)."""
    source = PREVIOUS_CHECKPOINT if previous else LAST_CHECKPOINT
    with atomic_path(best_checkpoint(run_dir, stage)) as tmp:
        shutil.copyfile(run_dir / CHECKPOINTS_DIR / source, tmp)


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
        raise ArtifactError(f"Could not read '{path}' ({npz_problem(exc)}). Start the run "
                            f"again with --overwrite.") from exc
    if not last:
        raise ArtifactError(f"'{path}' holds no head weights. Start the run again with "
                            f"--overwrite.")
    return last, best or None, optimizer


def save_best(run_dir: Path, model: Any, stage: str) -> None:
    """Saves `model` as the best of `stage` so far."""
    (run_dir / CHECKPOINTS_DIR).mkdir(parents=True, exist_ok=True)
    with atomic_path(best_checkpoint(run_dir, stage)) as tmp:
        model.save(tmp)


def checkpointed(run_dir: Path) -> tuple[str, int] | None:
    """The stage and epoch of the last checkpoint (what --resume continues after), None
    without a readable one. Training's history may be an epoch ahead of it when the run
    ended while that epoch was being saved."""
    try:
        state = read_json(run_dir / CHECKPOINTS_DIR / STATE_FILE)
    except ArtifactError:
        return None
    if isinstance(state, dict) and isinstance(state.get("stage"), str) and \
            isinstance(state.get("epoch"), int):
        return state["stage"], state["epoch"]
    return None


def load_checkpoint(run_dir: Path, stages: Sequence[str]) -> tuple[Any, dict[str, Any]]:
    """The last completed epoch's model (compiled, optimizer state restored) and the state
    to resume from (its stage, one of `stages`; its epoch; the history so far), checked.

    Raises:
        ArtifactError: there is no checkpoint yet, or it is damaged.
    """

    folder = run_dir / CHECKPOINTS_DIR
    if not (folder / STATE_FILE).is_file() or not (folder / LAST_CHECKPOINT).is_file():
        raise ArtifactError(
            f"'{run_dir}' has no checkpoint to resume from: it stopped before finishing its "
            f"first epoch. Start it again with --overwrite.")
    state = read_json(folder / STATE_FILE)
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
    with warnings.catch_warnings():  # a head-only checkpoint's optimizer state is its own
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        model = load_keras_file(folder / LAST_CHECKPOINT, "Start the run again with "
                                "--overwrite.", compile=True)
    return model, state

