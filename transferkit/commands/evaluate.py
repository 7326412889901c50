"""`evaluate`: how good a run is on labelled images: accuracy, top-k, per-class precision,
recall and F1, the confusion matrix, and the images it gets most confidently wrong."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferkit.config import EvaluateConfig
from transferkit.data.folders import ImageSet, load_labelled_folder
from transferkit.data.pipeline import build_dataset
from transferkit.errors import DataError
from transferkit.files import replace_path, save_figure, write_json
from transferkit.inference import predict_batches
from transferkit.metrics import Evaluation, classification_metrics
from transferkit.reporting import NullReporter, Reporter, printable
from transferkit.reports.plots import plot_confusion, plot_gallery
from transferkit.reports.run import Evaluated, write_run_report
from transferkit.runs.directory import (
    EVALUATION_DIR,
    EVALUATION_FILES,
    LoadedRun,
    check_output,
    load_run,
    load_run_splits,
    read_record,
    run_lock,
    seen_by_run,
)


@dataclass(frozen=True)
class EvaluationResult:
    evaluation: Evaluation
    output: Path
    source: str  # what was evaluated, in words
    mistakes: int


def _images_to_evaluate(config: EvaluateConfig, run: LoadedRun,
                        reporter: Reporter) -> tuple[ImageSet, str, str, int]:
    """The images, what they are in words, their split's name, and how many of them the run
    trained on or chose with."""
    if config.data_dir is not None:
        images = load_labelled_folder(config.data_dir, run.class_names, reporter)
        source = f"labelled folder '{config.data_dir}'"
        seen = seen_by_run(run.path, run.record, images.hashes, reporter)
        if seen:
            source += f" ({seen} of {len(images)} of its images trained or chose the model)"
            reporter.warning(f"{seen} of the {len(images)} images in '{config.data_dir}' have "
                             f"the same content as images the run trained on or chose its "
                             f"model with, so this score is not held out and flatters the "
                             f"model. Evaluate on images the run never saw.")
        return images, source, config.data_dir.name or "data", seen
    splits = load_run_splits(run.path, run.record, reporter)
    if splits.test is not None and len(splits.test):  # held out: the score that means most
        reporter.info(f"Scoring the run's test split ({len(splits.test)} images, held out).")
        return splits.test, f"the run's test split ({run.record.data_dir})", "test", 0
    if run.record.command == "cv":  # every train/val image trained some fold
        raise DataError(f"'{run.path}' is a cross-validation ensemble: each of its images "
                        f"trained some of its folds, so it has no held-out split of its own. "
                        f"Its out-of-fold accuracy is in run.json and oof.csv; pass a labelled "
                        f"folder to evaluate it on new images.")
    refitted = run.record.refit is not None  # val trained the saved model too
    reporter.info(f"Scoring the run's validation split ({len(splits.val)} images): the run has "
                  f"no test split, and val chose its model, so the score flatters it.")
    return (splits.val, f"the run's validation split ({run.record.data_dir})", "val",
            len(splits.val) if refitted else 0)


def evaluate(config: EvaluateConfig, reporter: Reporter | None = None) -> EvaluationResult:
    """Evaluates a run and writes metrics.json, confusion.png and mistakes.png into a fresh
    folder that then replaces the output folder in one step, so an earlier evaluation is
    never mixed with this one.

    Args:
        config: the run, the labelled images (default: the run's test split, else val) and
            the output folder.
        reporter: where progress goes (none when None).

    Returns:
        The metrics, where they were written, what was scored, and the mistakes shown.

    Raises:
        TransferkitError: the run or the images cannot be read, or the output exists (the
            run's own evaluation folder is replaced without --overwrite).
    """
    reporter = reporter or NullReporter()
    if config.output is not None:
        return _evaluate(config, reporter)
    read_record(config.run_dir)  # a missing folder is an error, not a folder to make
    with run_lock(config.run_dir):  # it writes RUN/evaluation
        return _evaluate(config, reporter)


def _evaluate(config: EvaluateConfig, reporter: Reporter) -> EvaluationResult:
    run = load_run(config.run_dir)
    output = config.output or config.run_dir / EVALUATION_DIR
    if config.output is not None:
        check_output(output, config.overwrite, what="evaluation folder",
                     data=config.data_dir, writes=EVALUATION_FILES)
    images, source, split, seen = _images_to_evaluate(config, run, reporter)
    if len(images) == 0:
        raise DataError(f"No usable labelled images in {source}.")
    ds = build_dataset(images.sources, None, run.image_size, config.batch_size)
    probabilities = predict_batches(run.model, ds, len(images), config.batch_size, reporter,
                                    "Evaluating")
    evaluation = classification_metrics(images.labels, probabilities, run.class_names,
                                        config.top_k, split, chose=config.data_dir is None and
                                        split == "val", seen=seen)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=output.parent) as tmp:
        staged = Path(tmp) / "evaluation"
        staged.mkdir()
        metrics_file, confusion_file, mistakes_file = EVALUATION_FILES
        write_json(staged / metrics_file, {"source": source, **evaluation.to_dict()})
        save_figure(staged / confusion_file,
                    plot_confusion(evaluation.confusion, run.class_names))
        wrong = _save_mistakes(staged / mistakes_file, images, probabilities, run,
                               config.gallery, config.batch_size)
        replace_path(staged, output)
    if config.output is None:  # the run's own evaluation: its report shows it
        write_run_report(config.run_dir, run.record,
                         [Evaluated(source, images, probabilities, evaluation, run.model,
                                    run.image_size)])
    return EvaluationResult(evaluation, output, source, wrong)


def _save_mistakes(path: Path, images: ImageSet, probabilities: np.ndarray, run: LoadedRun,
                   gallery: int, batch_size: int) -> int:
    """A gallery of the most confidently wrong images (if any); returns how many were wrong."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != images.labels)
    worst = wrong[np.argsort(-probabilities[wrong, predicted[wrong]], kind="stable")]
    worst = worst[:gallery]
    if len(worst):
        pictures = np.concatenate([np.asarray(b) for b in build_dataset(
            [images.sources[i] for i in worst], None, run.image_size, batch_size)])
        names = run.class_names
        captions = [f"{printable(images.paths[i].name)}\ntrue {names[images.labels[i]]}, said "
                    f"{names[predicted[i]]} ({probabilities[i, predicted[i]]:.2f})"
                    for i in worst]
        save_figure(path, plot_gallery(list(pictures), captions, "Most confidently wrong"))
    return len(wrong)
