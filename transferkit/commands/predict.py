"""Predictions for image files and folders from a run directory alone."""

from __future__ import annotations

import csv
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from transferkit.augment import TTA_VIEWS, ten_crops, tta_load_size
from transferkit.config import STDOUT, PredictConfig
from transferkit.data.folders import collect_images
from transferkit.data.inspect import decode_source, inspect_images, open_inspection_cache
from transferkit.data.pipeline import build_dataset
from transferkit.errors import ConfigError, DataError
from transferkit.files import json_text, write_text
from transferkit.inference import predict_batches
from transferkit.novelty import Novelty, load_novelty
from transferkit.raybatch import run_on_ray
from transferkit.reporting import NullReporter, Reporter
from transferkit.runs.directory import NOVELTY_FILE, check_output, load_run, seen_by_run

if TYPE_CHECKING:
    import keras


UNKNOWN = "unknown"  # the label of predictions below --threshold
NON_FINITE = ("the model gave NaN or infinite probabilities (its weights are damaged, or it "
              "diverged in training): train it again")


@dataclass(frozen=True)
class Prediction:
    """One file's answer: the top-k labels, or why it could not be read."""

    path: Path
    top_k: tuple[tuple[str, float], ...] = ()
    true_label: str | None = None  # the class named by the file's folder, if any
    error: str | None = None
    unknown: bool = False  # below --threshold, or (--reject-unknown) above the novelty threshold
    novelty: float | None = None  # higher = less like any training class (runs that have it)

    @property
    def label(self) -> str | None:
        if not self.top_k:
            return None
        return UNKNOWN if self.unknown else self.top_k[0][0]

    @property
    def probability(self) -> float | None:
        return self.top_k[0][1] if self.top_k else None

    def to_dict(self) -> dict[str, Any]:
        row = {"path": str(self.path), "label": self.label, "probability": self.probability,
               "true_label": self.true_label, "error": self.error,
               "top_k": [{"label": n, "probability": p} for n, p in self.top_k]}
        if self.unknown:
            row["best_guess"] = self.top_k[0][0]
        if self.novelty is not None:
            row["novelty"] = self.novelty
        return row


def answer(path: Path, probabilities: np.ndarray, class_names: tuple[str, ...], top_k: int,
           threshold: float | None = None, novelty: float | None = None,
           novelty_threshold: float | None = None, true_label: str | None = None
           ) -> Prediction:
    """One image's answer from its probabilities (predict's and serve's): the top k labels,
    'unknown' below `threshold` or, given `novelty_threshold` (--reject-unknown), above it;
    NaN or infinite probabilities are an error, not an answer."""
    if not np.isfinite(probabilities).all():
        return Prediction(path, true_label=true_label, error=NON_FINITE)
    order = np.argsort(-probabilities, kind="stable")[:min(top_k, len(class_names))]
    top = tuple((class_names[i], float(probabilities[i])) for i in order)
    unknown = (threshold is not None and top[0][1] < threshold) or (
        novelty_threshold is not None and novelty is not None and novelty > novelty_threshold)
    return Prediction(path, top, true_label, unknown=unknown, novelty=novelty)


@dataclass(frozen=True)
class TTAEffect:
    """How much test-time augmentation changed the answers, against one plain view."""

    views: int
    changed: int  # images whose top label changed
    mean_shift: float  # mean absolute change of the probabilities, over images and classes


@dataclass(frozen=True)
class PredictionReport:
    predictions: tuple[Prediction, ...]
    class_names: tuple[str, ...]
    accuracy: float | None  # over files whose folder names a class (unknown counts as wrong)
    labelled: int
    ignored: int  # non-image files found in folders
    unknown: int = 0  # predictions below the threshold, or too novel with --reject-unknown
    threshold: float | None = None
    tta: TTAEffect | None = None
    seen: int = 0  # labelled images the run trained on or chose with: not held out
    novelty_threshold: float | None = None  # the run's, when --reject-unknown

    @property
    def predicted(self) -> int:
        """Files that got an answer (the others could not be read)."""
        return sum(p.error is None for p in self.predictions)


def _predict_views(model: keras.Model, sources: list[str], image_size: int, batch_size: int,
                   reporter: Reporter, tta: bool) -> Any:
    """Class probabilities per image, of the plain view or averaged over the ten crops; for
    a model with features as well (model.with_features), [features, probabilities]."""
    if tta:
        batch_size = max(1, batch_size // TTA_VIEWS)  # each image becomes TTA_VIEWS inputs
        ds = build_dataset(sources, None, tta_load_size(image_size), batch_size,
                           augment=lambda x: ten_crops(x, image_size))
    else:
        ds = build_dataset(sources, None, image_size, batch_size)
    label = f"Predicting ({TTA_VIEWS} views each)" if tta else "Predicting"
    outputs = predict_batches(model, ds, len(sources), batch_size, reporter, label)
    if not tta:
        return outputs
    views = [a.reshape(len(sources), TTA_VIEWS, -1).mean(axis=1)
             for a in (outputs if isinstance(outputs, list) else [outputs])]
    return views if isinstance(outputs, list) else views[0]


@dataclass(frozen=True)
class RunModel:
    """A run's model (with its features too, for a novelty score) run on image files, plain
    or with --tta: the recipe this process and a Ray worker (raybatch.BatchJob) share."""

    run_dir: str
    features: bool
    image_size: int
    batch_size: int
    tta: bool = False

    def build(self) -> keras.Model:
        from transferkit.model import with_features

        model = load_run(Path(self.run_dir)).model
        return with_features(model) if self.features else model

    def run(self, model: keras.Model, sources: list[str]) -> Any:
        return _predict_views(model, sources, self.image_size, self.batch_size, NullReporter(),
                              self.tta)


def _novelty(run: Any, reject: bool) -> tuple[keras.Model, Novelty | None]:
    """The model to run (with its features too, when the run has a novelty score) and the
    score; --reject-unknown on a run without one is an error."""
    from transferkit.model import with_features

    path = run.path / NOVELTY_FILE
    if not path.exists():
        if reject:
            raise ConfigError(
                f"--reject-unknown needs the run's novelty score, and {run.path} has none "
                f"({NOVELTY_FILE}: finetune writes it when val holds 2 images or more; cv, "
                f"extract and runs from before it do not). Train the run again with "
                f"finetune, or use --threshold P for a cut on the top probability.")
        return run.model, None
    both = with_features(run.model)
    return both, load_novelty(path, both.output_shape[0][-1])


def _answers(model: keras.Model, novelty: Novelty | None, sources: list[str], run: Any,
             config: PredictConfig, reporter: Reporter
             ) -> tuple[np.ndarray, np.ndarray, TTAEffect | None]:
    """Probabilities (of the plain view, or averaged with --tta), novelty scores (none
    without a score) and what --tta changed, for every source; computed here, or on Ray's
    workers with --engine ray."""
    if not sources:
        return np.zeros((0, len(run.class_names)), np.float32), np.zeros(0), None
    views = [run_on_ray(RunModel(str(run.path.resolve()), novelty is not None, run.image_size,
                                 config.batch_size, tta), sources, config.engine, reporter,
                        "Predicting") if config.engine.engine == "ray" else
             _predict_views(model, sources, run.image_size, config.batch_size, reporter, tta)
             for tta in ((False, True) if config.tta else (False,))]
    scores = np.zeros(0)
    if novelty is not None:
        features, probabilities = views[-1]
        scores = novelty.score(features, probabilities)
        views = [probs for _, probs in views]
    probabilities, effect = views[-1], None
    if config.tta:
        plain = views[0]
        effect = TTAEffect(TTA_VIEWS, int((plain.argmax(1) != probabilities.argmax(1)).sum()),
                           float(np.abs(plain - probabilities).mean()))
    return probabilities, scores, effect


def predict(config: PredictConfig, reporter: Reporter | None = None) -> PredictionReport:
    """Predicts every image in `config.paths` with the run in `config.run_dir`.

    Args:
        config: the run, the paths (files, folders, patterns, a list from stdin) and the
            options.
        reporter: where progress goes (none when None).

    Returns:
        One prediction per file (an error row for a file that is not a usable image), and
        the accuracy where folders name classes.

    Raises:
        TransferkitError: the run cannot be read or a path does not exist.
    """
    reporter = reporter or NullReporter()
    if config.output is not None and config.output != STDOUT:
        check_output(config.output, config.overwrite)
    run = load_run(config.run_dir)
    files, ignored = collect_images(config.paths, config.listed)
    if not files:
        raise DataError(f"No image files found in {', '.join(map(str, config.paths))}. "
                        f"Pass .jpg/.png files or folders that contain them.")
    with open_inspection_cache() as cache:
        infos = inspect_images(files, reporter, cache)
    readable = [info for info in infos if info.usable]
    model, novelty = _novelty(run, config.reject_unknown)
    probabilities, scores, effect = _answers(model, novelty, [decode_source(i) for i in readable],
                                             run, config, reporter)
    rejecting = novelty.threshold if config.reject_unknown and novelty else None
    by_file = dict(zip((i.path for i in readable), probabilities, strict=True))
    novel = dict(zip((i.path for i in readable), scores, strict=False))
    predictions = []
    for info in infos:
        f = info.path
        true_label = f.parent.name if f.parent.name in run.class_names else None
        if not info.usable:
            predictions.append(Prediction(f, true_label=true_label, error=info.problem))
            continue
        predictions.append(answer(
            f, by_file[f], run.class_names, config.top_k, config.threshold,
            float(novel[f]) if f in novel else None, rejecting, true_label))
    scored = [p for p in predictions if p.true_label is not None and p.error is None]
    accuracy = (float(np.mean([p.label == p.true_label for p in scored])) if scored else None)
    hashes = {i.path: i.sha256 for i in readable}
    seen = seen_by_run(run.path, run.record, [hashes[p.path] for p in scored],
                       reporter) if scored else 0
    return PredictionReport(tuple(predictions), run.class_names, accuracy, len(scored),
                            len(ignored), sum(p.unknown for p in predictions), config.threshold,
                            effect, seen, novelty_threshold=rejecting)


PREDICTION_FIELDS = ("path", "label", "probability", "true_label", "error")
OPTIONAL_PREDICTION_FIELDS = ("best_guess", "novelty")  # --threshold; a run's novelty score


def predictions_text(report: PredictionReport, top_k: int, output_format: str) -> str:
    """The predictions as CSV (top-k as label_N/probability_N columns), JSON, or JSON Lines
    (one object per line)."""
    rows = [p.to_dict() for p in report.predictions]
    if output_format == "json":
        return json_text(rows)
    if output_format == "jsonl":
        return "".join(json_text(row, indent=None) for row in rows)
    top_k = min(top_k, len(report.class_names))  # no empty columns past the classes
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
    return buffer.getvalue()


def write_predictions(config: PredictConfig, report: PredictionReport,
                      output_format: str) -> None:
    """Writes the predictions to `config.output`, or to stdout for none or `-`."""
    text = predictions_text(report, config.top_k, output_format)
    if config.output is None or config.output == STDOUT:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_text(config.output, text)
