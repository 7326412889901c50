"""Classification metrics from labels and predicted probabilities (pure numpy): accuracy and
per-class recall with Wilson intervals, precision, F1, top-k, the confusion matrix and the
expected calibration error. evaluate, the run report, finetune and cv all measure this way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from transferkit.calibration import expected_calibration_error
from transferkit.runs.records import Score
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
            "images_the_run_trained_or_chose_on": self.score.seen,
            "top_k_accuracy": {str(k): v for k, v in self.top_k_accuracy.items()},
            "macro_f1": self.macro_f1, "expected_calibration_error": self.calibration_error,
            "per_class": [vars(c) for c in self.per_class],
            "class_names": list(self.class_names), "confusion": self.confusion.tolist(),
        }


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray,
                           class_names: tuple[str, ...], top_k: int = 3, split: str = "data",
                           chose: bool = False, seen: int = 0) -> Evaluation:
    """Metrics from true labels and predicted probabilities (pure numpy), the accuracy and
    each class's recall with a 95 % Wilson interval. `split` names what was evaluated,
    `chose` says whether it chose the model's epochs or stages and `seen` how many of its
    images the run trained on or chose with.

    Precision, recall and F1 are 0 where undefined (no predictions or no support).
    """
    k = len(class_names)
    predicted = probabilities.argmax(axis=1)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    ranked = np.argsort(-probabilities, axis=1, kind="stable")
    top = {n: float(np.mean([labels[i] in ranked[i, :n] for i in range(len(labels))]))
           for n in sorted({1, top_k}) if n == 1 or n < k}  # top-k of k classes: always 1
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
                      Score.of(split, correct, len(labels), chose, seen),
                      expected_calibration_error(probabilities, labels))
