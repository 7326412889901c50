"""`evaluate`: how good a run is on labelled images: accuracy, top-k, per-class precision,
recall and F1, the confusion matrix, and the images it gets most confidently wrong."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.calibration import expected_calibration_error
from transferkit.config import EvaluateConfig
from transferkit.data.folders import DataSplits, ImageSet, load_labelled_folder, splits_from_table
from transferkit.data.pipeline import build_dataset
from transferkit.errors import DataError
from transferkit.files import check_new_output, replace_path, save_figure, write_json
from transferkit.inference import predict_batches
from transferkit.plots import plot_confusion, plot_gallery
from transferkit.reporting import NullReporter, Reporter, printable
from transferkit.run_report import Evaluated, write_run_report
from transferkit.runs import (
    EVALUATION_DIR,
    LoadedRun,
    Score,
    load_run,
    read_record,
    read_splits,
    run_lock,
)
from transferkit.stats import wilson_interval


@dataclass(frozen=True)
class ClassMetrics:
    name: str
    precision: float
    recall: float
    f1: float
    support: int
    recall_low: float  # the recall's 95 % Wilson interval (its accuracy on this class)
    recall_high: float


@dataclass(frozen=True)
class Evaluation:
    class_names: tuple[str, ...]
    accuracy: float
    top_k_accuracy: dict[int, float]
    per_class: tuple[ClassMetrics, ...]
    confusion: np.ndarray  # rows: true class, columns: predicted
    macro_f1: float
    images: int
    score: Score  # the accuracy with its split, n and 95 % interval
    calibration_error: float  # expected calibration error: how far confidence is from accuracy

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images, "accuracy": self.accuracy,
            "accuracy_95ci": [self.score.low, self.score.high], "split": self.score.split,
            "split_chose_the_model": self.score.chose,
            "top_k_accuracy": {str(k): v for k, v in self.top_k_accuracy.items()},
            "macro_f1": self.macro_f1, "expected_calibration_error": self.calibration_error,
            "per_class": [vars(c) for c in self.per_class],
            "class_names": list(self.class_names), "confusion": self.confusion.tolist(),
        }


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray,
                           class_names: tuple[str, ...], top_k: int = 3, split: str = "data",
                           chose: bool = False) -> Evaluation:
    """Metrics from true labels and predicted probabilities (pure numpy), the accuracy and
    each class's recall with a 95 % Wilson interval. `split` names what was evaluated and
    `chose` says whether it chose the model's epochs or stages.

    Precision, recall and F1 are 0 where undefined (no predictions or no support).
    """
    k = len(class_names)
    predicted = probabilities.argmax(axis=1)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    ranked = np.argsort(-probabilities, axis=1, kind="stable")
    top = {n: float(np.mean([labels[i] in ranked[i, :n] for i in range(len(labels))]))
           for n in sorted({1, min(top_k, k)})}
    per_class = []
    for c, name in enumerate(class_names):
        tp = confusion[c, c]
        precision = tp / confusion[:, c].sum() if confusion[:, c].sum() else 0.0
        recall = tp / confusion[c].sum() if confusion[c].sum() else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        low, high = wilson_interval(int(tp), int(confusion[c].sum()))
        per_class.append(ClassMetrics(name, float(precision), float(recall), float(f1),
                                      int(confusion[c].sum()), low, high))
    correct = int((predicted == labels).sum())
    return Evaluation(class_names, correct / max(len(labels), 1), top, tuple(per_class),
                      confusion, float(np.mean([c.f1 for c in per_class])), len(labels),
                      Score.of(split, correct, len(labels), chose),
                      expected_calibration_error(probabilities, labels))


@dataclass(frozen=True)
class EvaluationResult:
    evaluation: Evaluation
    output: Path
    source: str  # what was evaluated, in words
    mistakes: int


def run_splits(run: LoadedRun, reporter: Reporter) -> DataSplits:
    """The splits a run was trained on, read again from its data folder.

    Raises:
        DataError: the data folder or the run's images are gone.
    """
    rows = read_splits(run.path, run.class_names)
    return splits_from_table(run.record.data_dir, run.class_names, rows, reporter)


def _images_to_evaluate(config: EvaluateConfig, run: LoadedRun,
                        reporter: Reporter) -> tuple[ImageSet, str, str]:
    """The images, what they are in words, and their split's name."""
    if config.data_dir is not None:
        return (load_labelled_folder(config.data_dir, run.class_names, reporter),
                f"labelled folder '{config.data_dir}'", config.data_dir.name or "data")
    splits = run_splits(run, reporter)
    if run.record.command == "cv":  # every train/val image trained some fold
        if splits.test is None or not len(splits.test):
            raise DataError(f"'{run.path}' is a cross-validation ensemble: each of its images "
                            f"trained some of its folds, so it has no held-out split of its "
                            f"own. Its out-of-fold accuracy is in run.json and oof.csv; pass "
                            f"a labelled folder to evaluate it on new images.")
        return splits.test, f"the run's test split ({run.record.data_dir})", "test"
    return splits.val, f"the run's validation split ({run.record.data_dir})", "val"


def evaluate(config: EvaluateConfig, reporter: Reporter | None = None) -> EvaluationResult:
    """Evaluates a run and writes metrics.json, confusion.png and mistakes.png into a fresh
    folder that then replaces the output folder in one step, so an earlier evaluation is
    never mixed with this one.

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
        check_new_output(output, config.overwrite, what="evaluation folder")
    images, source, split = _images_to_evaluate(config, run, reporter)
    if len(images) == 0:
        raise DataError(f"No usable labelled images in {source}.")
    ds = build_dataset(images.sources, None, run.image_size, config.batch_size)
    probabilities = predict_batches(run.model, ds, len(images), config.batch_size, reporter,
                                    "Evaluating")
    evaluation = classification_metrics(images.labels, probabilities, run.class_names,
                                        config.top_k, split, chose=split == "val")
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=output.parent) as tmp:
        staged = Path(tmp) / "evaluation"
        staged.mkdir()
        write_json(staged / "metrics.json", {"source": source, **evaluation.to_dict()})
        save_figure(staged / "confusion.png",
                    plot_confusion(evaluation.confusion, run.class_names))
        wrong = _save_mistakes(staged / "mistakes.png", images, probabilities, run,
                               config.gallery, config.batch_size)
        replace_path(staged, output)
    if config.output is None:  # the run's own evaluation: its report shows it
        write_run_report(config.run_dir, run.record,
                         [Evaluated(source, images, probabilities, evaluation)])
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
