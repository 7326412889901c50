"""`transferkit cv`: stratified, seeded K-fold cross-validation of the whole finetune recipe.

train and val are pooled (DATA/test stays out of it, for the ensemble's held-out score) and
cut into K stratified folds. Each fold runs the recipe as a complete finetune run in
RUN/folds/fold-K, choosing its epochs and candidates on an inner val split of its training
folds, so its predictions on the held-out fold are truly out of sample: oof.csv gives one per
image. The frozen-base features are cached, so the probe of every fold after the first costs
no pass through the base. The K fold models become one plain Keras model that averages their
probabilities: predict, evaluate and export take RUN like any run.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import signal
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferkit.bases import get_base, resolve_image_size
from transferkit.commands.finetune import finetune, resume_finetune
from transferkit.config import CVConfig, FinetuneConfig
from transferkit.data.folders import DataSplits, ImageSet, load_splits, split_validation
from transferkit.data.pipeline import build_dataset
from transferkit.errors import ArtifactError, DataError, RunInterrupted, StopRequested
from transferkit.files import write_text
from transferkit.inference import predict_batches
from transferkit.metrics import classification_metrics
from transferkit.reporting import NullReporter, Reporter
from transferkit.reports.run import Evaluated, write_run_report
from transferkit.runs.checkpoints import checkpointed
from transferkit.runs.directory import (
    FOLDS_DIR,
    MODEL_FILE,
    OOF_FILE,
    RECORD_FILE,
    check_resumable,
    check_run_output,
    clear_run,
    how_it_ended,
    how_to_continue,
    load_run,
    read_record,
    run_lock,
    save_record,
    save_run,
    save_splits,
)
from transferkit.runs.records import (
    COMPLETE,
    INTERRUPTED,
    RUNNING,
    CrossValidation,
    DataSummary,
    RunRecord,
    Score,
    Stopped,
)
from transferkit.training.prepare import data_summary
from transferkit.training.signals import raise_on_sigterm


@dataclass(frozen=True)
class CVResult:
    run_dir: Path
    record: RunRecord


def fold_dir(run_dir: Path, fold: int) -> Path:
    return run_dir / FOLDS_DIR / f"fold-{fold}"


def cross_validate(config: CVConfig, reporter: Reporter | None = None) -> CVResult:
    """Runs the recipe on each of K folds and writes the ensemble run directory.

    Args:
        config: the finetune recipe run on each fold, and K.
        reporter: where progress goes (none when None).

    Returns:
        The ensemble's run directory and its record (fold scores, out-of-fold score).

    Raises:
        TransferkitError: bad data or options (a class with fewer images than folds), or an
            existing output; RunInterrupted when stopped by a signal (then run.json says
            where, and `cv --resume` continues).
    """
    reporter = reporter or NullReporter()
    output = config.recipe.output
    if output is None:
        raise ArtifactError("cv needs a run directory for its ensemble: pass -o RUN.")
    with run_lock(output), raise_on_sigterm():
        check_run_output(output, config.recipe.overwrite, config.recipe.data.data_dir, "cv")
        return _cross_validate(config, output, reporter, resuming=False)


def resume_cv(run_dir: Path, reporter: Reporter | None = None) -> CVResult:
    """Continues an interrupted cv run with its saved settings: finished folds are kept,
    an interrupted fold continues from its checkpoint, the others run.

    Args:
        run_dir: the interrupted cv run; its settings are run.json's.
        reporter: where progress goes (none when None).

    Returns:
        As cross_validate.

    Raises:
        ArtifactError: `run_dir` is not an unfinished cv run.
    """
    reporter = reporter or NullReporter()
    record = read_record(run_dir, finished=False)
    check_resumable(run_dir, record, "cv")
    assert isinstance(record.config, FinetuneConfig)  # check_resumable checked the command
    if record.cross_validation is None:
        raise ArtifactError(f"'{run_dir}' does not say how many folds it has; start it again "
                            f"with `transferkit cv ... -o {run_dir} --overwrite`.")
    config = CVConfig(recipe=dataclasses.replace(record.config, output=run_dir),
                      folds=record.cross_validation.folds)
    with run_lock(run_dir), raise_on_sigterm():
        return _cross_validate(config, run_dir, reporter, resuming=True)


def _cross_validate(config: CVConfig, output: Path, reporter: Reporter,
                    resuming: bool) -> CVResult:
    from sklearn.model_selection import StratifiedKFold

    recipe = config.recipe
    splits = load_splits(recipe.data.data_dir, recipe.data.val_split, recipe.data.seed, reporter)
    pooled = splits.train.join(splits.val)
    names = splits.class_names
    counts = np.bincount(pooled.labels, minlength=len(names))
    if counts.min() < config.folds:
        small = ", ".join(f"{names[i]} ({counts[i]})" for i in np.flatnonzero(
            counts < config.folds)[:10])
        raise DataError(f"--folds {config.folds} needs at least {config.folds} images per "
                        f"class outside test/, so that every fold holds out each class; these "
                        f"have fewer: {small}. Use fewer folds or add images.")
    if recipe.overwrite and not resuming:
        clear_run(output)
    folds = StratifiedKFold(config.folds, shuffle=True, random_state=recipe.data.seed)
    fold_of = np.zeros(len(pooled), int)
    for k, (_, held_idx) in enumerate(folds.split(np.zeros(len(pooled)), pooled.labels), 1):
        fold_of[held_idx] = k
    save_splits(output, _split_rows(pooled, splits.test, fold_of))
    record = _running_record(config, splits)
    save_record(output, record)
    oof = np.zeros((len(pooled), len(names)), np.float32)
    scores: list[Score] = []
    try:
        for k in range(1, config.folds + 1):
            held = fold_of == k
            inner_train, inner_val = split_validation(pooled.subset(~held),
                                                      recipe.data.val_split, recipe.data.seed)
            reporter.info(f"Fold {k}/{config.folds}: {len(inner_train)} train, "
                          f"{len(inner_val)} val (choosing epochs and models), {held.sum()} "
                          f"held out.")
            oof[held], held_out = _run_fold(config, output, k, reporter, DataSplits(
                names, inner_train, inner_val, pooled.subset(held), False, splits.skipped))
            scores.append(dataclasses.replace(held_out, split=f"fold {k}"))
            reporter.info(scores[-1].describe())
            record = save_record(output, record.replace(cross_validation=CrossValidation(
                folds=config.folds, fold_scores=tuple(scores))))
        return _save_ensemble(config, output, splits, pooled, oof, fold_of, tuple(scores),
                              reporter)
    except (KeyboardInterrupt, StopRequested, RunInterrupted) as exc:
        signum = signal.SIGINT if isinstance(exc, KeyboardInterrupt) else exc.signum
        name = signal.Signals(signum).name
        save_record(output, record.replace(status=INTERRUPTED, stopped=Stopped(
            phase=f"fold {len(scores) + 1} of {config.folds}", signal=name)))
        raise RunInterrupted(f"Stopped by {name} during fold {len(scores) + 1} of "
                             f"{config.folds}; {len(scores)} fold(s) are done. "
                             f"{how_to_continue(output, 'cv')}", signum) from None
    except BaseException as exc:
        with contextlib.suppress(OSError):  # a full disk may refuse this write too
            save_record(output, record.replace(**how_it_ended(
                exc, f"fold {len(scores) + 1} of {config.folds}")))
        raise


def _running_record(config: CVConfig, splits: DataSplits) -> RunRecord:
    """run.json while the folds run: the settings, the data, how many folds."""
    spec = get_base(config.recipe.base)
    return RunRecord(
        command="cv", config=config.recipe, base=spec.name, base_layer="",
        preprocessing=spec.preprocessing, class_names=splits.class_names,
        image_size=resolve_image_size(spec, config.recipe.data.image_size),
        data=_pooled_summary(splits), status=RUNNING,
        cross_validation=CrossValidation(folds=config.folds, fold_scores=()))


def _run_fold(config: CVConfig, output: Path, k: int, reporter: Reporter,
              splits: DataSplits) -> tuple[np.ndarray, Score]:
    """Fold k's probabilities on the images it held out, and its score there: from its run
    when that finished before (a resumed cv), else by finishing or running it."""
    folder = fold_dir(output, k)
    record = read_record(folder, finished=False) if (folder / RECORD_FILE).is_file() else None
    if record is not None and record.status == COMPLETE and folder.joinpath(MODEL_FILE).is_file():
        reporter.info(f"Fold {k} finished before: its model is kept.")
        batch = config.recipe.data.batch_size
        assert splits.test is not None
        probabilities = predict_batches(
            load_run(folder).model, build_dataset(splits.test.sources, None, record.image_size,
                                                  batch), len(splits.test), batch, reporter,
            f"Fold {k}'s held-out images")
        return probabilities, next(s for s in record.scores if s.split == "test")
    if record is not None and record.status in (INTERRUPTED, RUNNING) and \
            checkpointed(folder) is not None:
        result = resume_finetune(folder, reporter)
    else:  # not begun, or stopped before its first checkpoint: run it (again)
        result = finetune(dataclasses.replace(config.recipe, output=folder,
                                              overwrite=record is not None), reporter, splits)
    assert result is not None and result.test_probabilities is not None
    return result.test_probabilities, next(s for s in result.scores if s.split == "test")


def _split_rows(pooled: ImageSet, test: ImageSet | None, fold_of: np.ndarray
                ) -> list[tuple[str, ...]]:
    """splits.csv of a cv run: every pooled image trained the ensemble (each of its models
    but the one whose fold held it out), so its split is train and its fold is named."""
    names = pooled.class_names
    rows = [(p.as_posix(), names[label], "train", str(k))
            for p, label, k in zip(pooled.paths, pooled.labels, fold_of, strict=True)]
    if test is not None:
        rows += [(p.as_posix(), names[label], "test", "")
                 for p, label in zip(test.paths, test.labels, strict=True)]
    return rows


def _save_ensemble(config: CVConfig, output: Path, splits: DataSplits, pooled: ImageSet,
                   oof: np.ndarray, fold_of: np.ndarray, scores: tuple[Score, ...],
                   reporter: Reporter) -> CVResult:
    """oof.csv, the averaged model of the K folds, its test score, and run.json."""
    names = splits.class_names
    _write_oof(output / OOF_FILE, pooled, oof, fold_of)
    correct = int((oof.argmax(axis=1) == pooled.labels).sum())
    summary = [Score.of("out-of-fold", correct, len(pooled), chose=False)]
    runs = [load_run(fold_dir(output, k)) for k in range(1, config.folds + 1)]
    model = average_models([run.model for run in runs])
    first = runs[0].record
    test = None
    if splits.test is not None and len(splits.test):
        batch = config.recipe.data.batch_size
        ds = build_dataset(splits.test.sources, None, first.image_size, batch)
        test = predict_batches(model, ds, len(splits.test), batch, reporter,
                               "Scoring the ensemble on the test split")
        summary.append(Score.of("test", int((test.argmax(axis=1) == splits.test.labels).sum()),
                                len(splits.test), chose=False))
    accuracies = [s.accuracy for s in scores]
    record = RunRecord(
        command="cv", config=config.recipe, base=first.base, base_layer=first.base_layer,
        preprocessing=first.preprocessing, class_names=names, image_size=first.image_size,
        compute=first.compute, data=_pooled_summary(splits), status=RUNNING,
        scores=tuple(summary),
        cross_validation=CrossValidation(
            folds=config.folds, fold_scores=scores, mean=round(statistics.mean(accuracies), 4),
            sd=round(statistics.stdev(accuracies), 4)))
    save_record(output, record)
    record = save_run(output, model, record, [])
    evaluated = [Evaluated("out-of-fold predictions (each image by the fold that never saw it)",
                           pooled, oof, classification_metrics(
                               pooled.labels, oof, names, split="out-of-fold"))]
    if test is not None and splits.test is not None:
        evaluated.append(Evaluated("test (the ensemble, held out)", splits.test, test,
                                   classification_metrics(splits.test.labels, test, names,
                                                          split="test")))
    write_run_report(output, record, evaluated)
    reporter.info(f"Saved the {config.folds}-fold ensemble to '{output}'.")
    return CVResult(output, record)


def _pooled_summary(splits: DataSplits) -> DataSummary:
    """The data as cv used it: train and val pooled into folds, and test."""
    summary = data_summary(splits)
    counts = {"cross-validated": {c: summary.counts["train"][c] + summary.counts["val"][c]
                                  for c in splits.class_names}}
    return dataclasses.replace(summary, counts=counts | {
        k: v for k, v in summary.counts.items() if k == "test"})


def average_models(models: list) -> object:
    """One Keras model whose output is the mean of the models' probabilities."""
    import keras

    inputs = keras.Input(models[0].input_shape[1:], name="image")
    members = [keras.Model(m.input, m.output, name=f"fold_{k}")(inputs)
               for k, m in enumerate(models, 1)]
    return keras.Model(inputs, keras.layers.Average(name="average")(members), name="ensemble")


def _write_oof(path: Path, images: ImageSet, probabilities: np.ndarray,
               fold_of: np.ndarray) -> None:
    """path, label, fold, predicted, its probability, then one column per class."""
    names = images.class_names
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "label", "fold", "predicted", "probability",
                     *(f"p_{n}" for n in names)])
    for p, label, fold, row in zip(images.paths, images.labels, fold_of, probabilities,
                                   strict=True):
        best = int(row.argmax())
        writer.writerow([p.as_posix(), names[label], int(fold), names[best],
                         f"{row[best]:.6f}", *(f"{v:.6f}" for v in row)])
    write_text(path, buffer.getvalue())
