"""RUN/report.html: what a run is and how good it is, on one self-contained page. finetune,
cv and extract --train-head write it; evaluate writes it again with its own evaluation.
Built from report.py's pieces; the numbers come from run.json and the predictions given."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from transferkit.files import write_text
from transferkit.novelty import load_novelty
from transferkit.reports import html as report
from transferkit.reports.gradcam import gradcam, has_feature_map
from transferkit.runs.directory import CURVES_FILE, NOVELTY_FILE, REPORT_FILE
from transferkit.runs.records import Choice, RunRecord
from transferkit.training.candidates import (
    fitted_before_the_stages,
    labelled_the_pool,
    simplest_first,
)
from transferkit.training.choice import tried, why_kept
from transferkit.training.plan import trains_on_images
from transferkit.training.stages import window_note

if TYPE_CHECKING:
    from transferkit.data.folders import ImageSet
    from transferkit.metrics import Evaluation

GALLERY = 12  # confidently wrong images shown per evaluated split


@dataclass(frozen=True)
class Evaluated:
    """Predictions of the run's model on one labelled set, and their metrics."""

    name: str  # what was evaluated, in words: "val (chose the model)", "test", a folder
    images: ImageSet
    probabilities: np.ndarray
    metrics: Evaluation
    model: Any = None  # when given (a single classifier), mistakes get Grad-CAM maps
    image_size: int = 0


def write_run_report(run_dir: Path, record: RunRecord, evaluated: Sequence[Evaluated],
                     features: tuple[np.ndarray, ImageSet] | None = None) -> Path:
    """Writes RUN/report.html; `features` (of any images, with their labels) draw the map."""
    sections = [_summary(record), _scores(record)]
    sections += [report.section(f"On {e.name}", *_evaluation(e)) for e in evaluated]
    kept = ("the star marks the kept epoch" if record.kept_stage not in (None, "probe") else
            "the kept model is the linear probe, fitted before these epochs, so no epoch is "
            "marked")
    curves = report.png(run_dir / CURVES_FILE, f"Training and validation loss and accuracy per "
                                               f"epoch; {kept}.")
    if curves:
        sections.append(report.section("Curves", curves))
    if features is not None and len(features[0]) > 2:
        sections.append(_map(*features))
    novelty = load_novelty(run_dir / NOVELTY_FILE) if record.novelty is not None else None
    if novelty is not None:
        sections.append(report.section(
            "Novelty", report.histogram(novelty.val_scores, novelty.threshold,
                                        f"threshold {novelty.threshold:.2f}"),
            note=f"Novelty scores of the {len(novelty.val_scores)} val images (known classes, "
                 f"not in the bank of {len(novelty.bank)} train images it compares with). "
                 f"predict gives every image this score; above the threshold, where val "
                 f"set it so that {novelty.accept:.0%} of known images fall below, "
                 f"predict --reject-unknown labels it unknown."))
    page = report.page(f"transferkit run: {run_dir.name}",
                       f"{record.command} of {record.data_dir}, {record.base} at "
                       f"{record.image_size} px; status {record.status}; updated "
                       f"{record.updated}", sections)
    write_text(run_dir / REPORT_FILE, page)
    return run_dir / REPORT_FILE


def _summary(record: RunRecord) -> str:
    config = record.config
    rows = [["data", report.esc(record.data_dir)],
            ["classes", report.esc(", ".join(record.class_names))],
            ["base", report.esc(f"{record.base} ({getattr(config, 'weights', '')}), "
                                f"{record.image_size} px")]]
    counts = record.data.counts
    rows.append(["images", report.esc(", ".join(f"{sum(c.values())} {split}"
                                                for split, c in counts.items()))])
    if record.probe is not None:
        rows.append(["linear probe", report.esc(
            f"a logistic regression on the frozen base's features, fitted first: the bar "
            f"every later candidate must clear by more than noise (C={record.probe.c:g} by "
            f"{record.probe.folds}-fold CV on train; first usable model after "
            f"{record.probe.ready_after:.0f} s)")])
    if record.adaptation is not None:
        rows.append(["data checks", report.esc(record.adaptation.describe())])
    for candidate in simplest_first(record.candidates):
        rows.append([report.esc(candidate.name), report.esc(candidate.describe())])
    window = getattr(config, "epoch_window", 1)  # an extract run's config has none
    smoothing = record.plan.label_smoothing if record.plan else None
    pool = labelled_the_pool(record.candidates)
    for stage in record.stages:
        chosen = window_note(window, stage.epochs)
        on_pool = "" if pool is None or record.plan is None or not trains_on_images(
            stage.name, record.plan) else (f", on train and the {pool.details['pseudo_labelled']}"
                                           f" pool images '{pool.name}' labelled")
        rows.append([f"stage {report.esc(stage.name)}", report.esc(
            f"{stage.epochs} epochs at {stage.learning_rate:.2g}"
            f"{f', label smoothing {smoothing:g}' if smoothing else ''}{on_pool}, best epoch "
            f"{stage.best_epoch}{f' ({chosen})' if chosen else ''}, "
            f"{stage.trainable_params:,} trainable parameters")])
    if record.kept_stage:
        rows.append(["kept model", f"<b>{report.esc(record.kept_stage)}</b>: "
                                   f"{report.esc(why_kept(record.kept_stage))}"])
    if record.refit is not None:
        rows.append(["refit", report.esc(
            f"the {record.refit.model} model was fitted again on train + val "
            f"({record.refit.images} images"
            + (f", {record.refit.epochs} epochs" if record.refit.epochs else "")
            + ") once chosen; val scores are of the model before the refit")])
    if record.calibration is not None:
        rows.append(["calibration", report.esc(record.calibration.describe())])
    return report.section("Run", report.table(["", ""], rows))


def _candidates(record: RunRecord, choice: Choice) -> str:
    """Every candidate tried, simplest first: those the choice read, with those fitted before
    the stages that did not beat the probe placed before the stages."""
    dropped = fitted_before_the_stages(record.candidates, False)
    rows = [[report.esc(name), f"{n}/{choice.n}", "-" if step is None else f"{step.margin:+d}",
             "-" if step is None else f"{step.noise:.1f}",
             "kept" if name == choice.kept else "not beyond the probe" if name in dropped
             else ""]
            for name, n, step in tried(choice, dropped, {s.name for s in record.stages})]
    return report.table(["candidate (simplest first)", "right on val", "vs kept so far",
                         "noise", ""], rows, [False, True, True, True, False])


def _scores(record: RunRecord) -> str:
    rows = [[report.esc(s.split), str(s.n), str(s.correct), f"<b>{s.accuracy:.3f}</b>",
             f"{s.low:.3f} - {s.high:.3f}",
             "<span class=\"bad\">yes: optimistic</span>" if s.chose else
             "<span class=\"good\">no: held out</span>"] for s in record.scores]
    parts = [report.table(["split", "n", "right", "accuracy", "95 % CI (Wilson)",
                           "chose the model"], rows,
                          [False, True, True, True, True, False])]
    if record.choice is not None:
        parts.append(_candidates(record, record.choice))
    if record.cross_validation is not None:
        cv = record.cross_validation
        parts.append(report.table(
            ["fold", "n", "accuracy", "95 % CI"],
            [[report.esc(s.split), str(s.n), f"{s.accuracy:.3f}", f"{s.low:.3f} - {s.high:.3f}"]
             for s in cv.fold_scores], [False, True, True, True]))
        parts.append(f"<p>Mean fold accuracy {cv.mean:.3f} (sd {cv.sd:.3f}).</p>")
    return report.section(
        "How good it is", *parts,
        note="Every accuracy with its n and 95 % interval. A split that chose epochs or "
             "models flatters the model; a held-out one does not.")


def _evaluation(e: Evaluated) -> list[str]:
    m = e.metrics
    names = m.class_names
    per_class = report.table(
        ["class", "precision", "recall", "recall 95 % CI", "F1", "support"],
        [[report.esc(c.name), f"{c.precision:.3f}", f"{c.recall:.3f}",
          f"{c.recall_low:.2f} - {c.recall_high:.2f}", f"{c.f1:.3f}", str(c.support)]
         for c in m.per_class], [False, True, True, True, True, True])
    confusion = report.table(
        ["true \\ predicted", *names],
        [[report.esc(name), *(f"<b>{n}</b>" if i == j else (str(n) if n else "")
                              for j, n in enumerate(row))]
         for i, (name, row) in enumerate(zip(names, m.confusion, strict=True))],
        [False] + [True] * len(names))
    predicted = e.probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != e.images.labels)
    wrong = wrong[np.argsort(-e.probabilities[wrong, predicted[wrong]])][:GALLERY]
    maps = {}
    if e.model is not None and len(wrong) and has_feature_map(e.model):
        cams = gradcam(e.model, [e.images.sources[i] for i in wrong], predicted[wrong],
                       e.image_size)
        maps = {i: report.heatmap(e.images.sources[i], cam, 180)
                for i, cam in zip(wrong, cams, strict=True)}
    cards = "".join(
        f"<div class=\"card\">{report.thumbnail(e.images.sources[i], 180)}"
        f"{maps.get(i, '')}<div>"
        f"<span class=\"path\">{report.esc(e.images.paths[i].as_posix())}</span><br>"
        f"given <b>{report.esc(names[e.images.labels[i]])}</b>, predicted "
        f"<b class=\"bad\">{report.esc(names[predicted[i]])}</b> "
        f"({e.probabilities[i, predicted[i]]:.2f})</div></div>" for i in wrong)
    return [f"<p>{report.esc(m.score.describe())}; macro F1 {m.macro_f1:.3f}; expected "
            f"calibration error {m.calibration_error:.3f}.</p>", per_class,
            "<h3>Confusion matrix</h3>", confusion,
            f"<h3>Most confident mistakes ({len(wrong)} shown)</h3>"
            + ("<p class=\"muted\">Under each, Grad-CAM: where the model looked for the "
               "class it predicted (red: most).</p>" if maps else ""),
            f"<div class=\"cards\">{cards}</div>" if cards else "<p>No mistakes.</p>"]


def _map(features: np.ndarray, images: ImageSet) -> str:
    points = report.projected(features)
    titles = [f"{p.as_posix()} ({images.class_names[label]})"
              for p, label in zip(images.paths, images.labels, strict=True)]
    return report.section("Embedding map", report.scatter(points, images.labels,
                                                          images.class_names, titles),
                          note="Frozen-base features projected on their first two principal "
                               "components, coloured by label.")
