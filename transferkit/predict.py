"""Predictions for image files and folders from a run directory alone."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.artifacts import load_run
from transferkit.callbacks import PredictProgress
from transferkit.config import PredictConfig
from transferkit.data import (
    build_dataset,
    collect_images,
    decode_source,
    inspect_images,
    open_inspection_cache,
)
from transferkit.errors import DataError
from transferkit.reporting import NullReporter, Reporter


@dataclass(frozen=True)
class Prediction:
    """One file's answer: the top-k labels, or why it could not be read."""

    path: Path
    top_k: tuple[tuple[str, float], ...] = ()
    true_label: str | None = None  # the class named by the file's folder, if any
    error: str | None = None

    @property
    def label(self) -> str | None:
        return self.top_k[0][0] if self.top_k else None

    @property
    def probability(self) -> float | None:
        return self.top_k[0][1] if self.top_k else None

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "label": self.label, "probability": self.probability,
                "true_label": self.true_label, "error": self.error,
                "top_k": [{"label": n, "probability": p} for n, p in self.top_k]}


@dataclass(frozen=True)
class PredictionReport:
    predictions: tuple[Prediction, ...]
    class_names: tuple[str, ...]
    accuracy: float | None  # over files whose folder names a class
    labelled: int
    ignored: int  # non-image files found in folders


def predict(config: PredictConfig, reporter: Reporter | None = None) -> PredictionReport:
    """Predicts every image in `config.paths` with the run in `config.run_dir`.

    Raises:
        TransferkitError: the run cannot be read or a path does not exist.
    """
    reporter = reporter or NullReporter()
    run = load_run(config.run_dir)
    files, ignored = collect_images(config.paths)
    if not files:
        raise DataError(f"No image files found in {', '.join(map(str, config.paths))}. "
                        f"Pass .jpg/.png files or folders that contain them.")
    with open_inspection_cache() as cache:
        infos = inspect_images(files, reporter, cache)
    readable = [info for info in infos if info.usable]
    probabilities = np.zeros((0, len(run.class_names)), np.float32)
    if readable:
        ds = build_dataset([decode_source(i) for i in readable], None, run.image_size,
                           config.batch_size)
        reporter.start_progress("Predicting", math.ceil(len(readable) / config.batch_size))
        probabilities = run.model.predict(ds, verbose=0, callbacks=[PredictProgress(reporter)])
        reporter.stop_progress()
    k = min(config.top_k, len(run.class_names))
    by_file = dict(zip((i.path for i in readable), probabilities, strict=True))
    predictions = []
    for info in infos:
        f = info.path
        true_label = f.parent.name if f.parent.name in run.class_names else None
        if not info.usable:
            predictions.append(Prediction(f, true_label=true_label, error=info.problem))
            continue
        p = by_file[f]
        order = np.argsort(-p, kind="stable")[:k]
        predictions.append(Prediction(
            f, tuple((run.class_names[i], float(p[i])) for i in order), true_label))
    scored = [p for p in predictions if p.true_label is not None and p.error is None]
    accuracy = (float(np.mean([p.label == p.true_label for p in scored])) if scored else None)
    return PredictionReport(tuple(predictions), run.class_names, accuracy, len(scored),
                            len(ignored))
