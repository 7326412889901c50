"""`transferkit audit`: what is wrong with the data, before any recipe is tuned on it.

From the frozen-base features of every image (cached, so an audit after a run costs no pass
through the base):
- label issues: out-of-fold probabilities of a cross-validated linear probe, given to
  cleanlab's confident learning (`find_label_issues`, ranked by its label quality score);
- near-duplicates: pairs whose perceptual fingerprints (blurred grey thumbnails, aligned over
  small crops) correlate at --duplicate-similarity or more, marked when they cross splits (a
  leak) or classes (a contradiction);
- outliers: images far from their own class's centre and from every other class's.
audit writes audit.json and report.html into its output folder, and never moves or edits data.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.config import AuditConfig
from transferkit.data.folders import ImageSet, load_splits
from transferkit.data.inspect import small_image
from transferkit.features import base_features, normalise
from transferkit.files import replace_path, write_json, write_text
from transferkit.reporting import NullReporter, Reporter
from transferkit.reports import html as report
from transferkit.runs.directory import AUDIT_FILE, AUDIT_FILES, REPORT_FILE, check_output
from transferkit.training.probe import out_of_fold_probabilities

THUMB_PX = 32
BLUR = 1.5  # Gaussian sigma, pixels of the thumbnail: forgives the half-pixel shifts of a crop
CANDIDATES = 10  # per image: nearest by whole-image fingerprint (and half as many by embedding)
OUTLIER_FENCE = 1.5  # Tukey: beyond Q3 + 1.5 IQR of the distances to the own class's centre


@dataclass(frozen=True)
class LabelIssue:
    path: str
    given: str
    suggested: str
    score: float  # cleanlab's label quality: near 0 for a likely wrong label
    split: str


@dataclass(frozen=True)
class NearDuplicate:
    paths: tuple[str, str]
    similarity: float  # perceptual: correlation of grey thumbnails, aligned over crops
    embedding_similarity: float  # cosine similarity of the base's features
    cross_split: bool
    cross_class: bool
    splits: tuple[str, str]
    labels: tuple[str, str]


@dataclass(frozen=True)
class Outlier:
    path: str
    label: str
    distance_to_class: float  # cosine distance to the centre of its class
    nearest_other_class: str
    distance_to_other: float  # ... and to the centre of the nearest other class
    split: str


@dataclass(frozen=True)
class AuditResult:
    output: Path
    images: int
    label_issues: tuple[LabelIssue, ...]
    label_quality: tuple[tuple[str, float], ...]  # every image, least likely label first
    near_duplicates: tuple[NearDuplicate, ...]
    outliers: tuple[Outlier, ...]
    oof_accuracy: float
    seconds: float


def audit(config: AuditConfig, reporter: Reporter | None = None) -> AuditResult:
    """Audits `config.data` and writes audit.json and report.html into `config.output`.

    Args:
        config: the data folder, base and output folder.
        reporter: where progress goes (none when None).

    Returns:
        The counts and findings written to audit.json, with the seconds taken.

    Raises:
        TransferkitError: bad data or options, or an existing output.
    """
    reporter = reporter or NullReporter()
    started = time.perf_counter()
    check_output(config.output, config.overwrite, what="audit folder",
                 data=config.data.data_dir, writes=AUDIT_FILES)
    splits = load_splits(config.data.data_dir, config.data.val_split, config.data.seed,
                         reporter, use_cache=config.cache)
    named = splits.items()
    images = splits.every_image()
    split_of = np.array([name for name, s in named for _ in range(len(s))])
    features = base_features(config.base, config.weights, config.data, images, reporter,
                             config.cache, config.engine)
    reporter.info(f"Auditing {len(images)} images in {len(images.class_names)} classes.")
    probabilities = out_of_fold_probabilities(features, images.labels,
                                              len(images.class_names), config.data.seed)
    issues, quality = label_issues(images, probabilities, split_of)
    pairs = near_duplicates(images, features, split_of, config.duplicate_similarity)
    far = outliers(images, features, split_of)
    oof = float((probabilities.argmax(axis=1) == images.labels).mean())
    result = AuditResult(config.output, len(images), issues, quality, pairs, far, oof,
                         time.perf_counter() - started)
    _write(config, result, images, features, split_of, probabilities, splits.skipped)
    return result


def label_issues(images: ImageSet, probabilities: np.ndarray, split_of: np.ndarray
                 ) -> tuple[tuple[LabelIssue, ...], tuple[tuple[str, float], ...]]:
    """Confident learning's label issues, most suspicious (lowest label quality) first; and
    every image's label quality, lowest first."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    names = images.class_names
    with warnings.catch_warnings():  # classes with few images
        warnings.simplefilter("ignore")
        quality = get_label_quality_scores(images.labels, probabilities)
        flagged = find_label_issues(images.labels, probabilities,
                                    return_indices_ranked_by="self_confidence")
    issues = tuple(LabelIssue(path=images.paths[i].as_posix(), given=names[images.labels[i]],
                              suggested=names[int(probabilities[i].argmax())],
                              score=round(float(quality[i]), 4), split=str(split_of[i]))
                   for i in sorted(flagged, key=lambda i: quality[i]))
    ranking = tuple((images.paths[i].as_posix(), round(float(quality[i]), 4))
                    for i in np.argsort(quality, kind="stable"))
    return issues, ranking


def _crop_boxes() -> tuple[tuple[float, float, float, float], ...]:
    """The whole image, then 5 % and 10 % cut off: at each corner, and around the centre."""
    boxes = [(0.0, 0.0, 1.0, 1.0)]
    for f in (0.05, 0.1):
        boxes += [(f, f, 1, 1), (0, f, 1 - f, 1), (f, 0, 1, 1 - f), (0, 0, 1 - f, 1 - f),
                  (f / 2, f / 2, 1 - f / 2, 1 - f / 2)]
    return tuple(boxes)


CROP_BOXES = _crop_boxes()


def thumbnails(source: str) -> np.ndarray:
    """The image's perceptual fingerprints, one per CROP_BOX: grey, THUMB_PX square,
    slightly blurred, zero mean and unit norm, so that their dot product is a correlation
    that resizing and re-encoding hardly move. Written here (Pillow and numpy, a few lines)
    because perceptual-hash packages compare whole images only and miss crops."""
    from PIL import Image, ImageFilter

    grid = 3 * THUMB_PX
    grey = small_image(source, "L", grid)
    out = []
    for x0, y0, x1, y1 in CROP_BOXES:
        crop = grey.crop((round(x0 * grid), round(y0 * grid), round(x1 * grid),
                          round(y1 * grid))).resize((THUMB_PX, THUMB_PX),
                                                    Image.Resampling.LANCZOS)
        v = np.asarray(crop.filter(ImageFilter.GaussianBlur(BLUR)), np.float64).ravel()
        v -= v.mean()
        out.append(v / max(np.linalg.norm(v), 1e-12))
    return np.stack(out)


def near_duplicates(images: ImageSet, features: np.ndarray, split_of: np.ndarray,
                    threshold: float) -> tuple[NearDuplicate, ...]:
    """Pairs that are copies of one another up to resizing, re-encoding or a slight crop,
    most similar first. Each image is compared in full with the candidates nearest to it
    (by whole-image fingerprint and by embedding), and a pair scores the best correlation of
    one image with any crop of the other."""
    prints = np.stack([thumbnails(s) for s in images.sources])  # (n, crops, pixels)
    whole = prints[:, 0]
    unit = normalise(features)
    embedding = unit @ unit.T
    candidates = set()
    for scores, k in ((whole @ whole.T, CANDIDATES), (embedding, CANDIDATES // 2)):
        np.fill_diagonal(scores, -np.inf)
        nearest = np.argsort(-scores, axis=1)[:, :k]
        candidates |= {(min(i, j), max(i, j)) for i, row in enumerate(nearest) for j in row}
    names = images.class_names
    pairs = []
    for i, j in sorted(candidates):
        score = max(float((prints[j] @ whole[i]).max()), float((prints[i] @ whole[j]).max()))
        if score >= threshold:
            pairs.append(NearDuplicate(
                paths=(images.paths[i].as_posix(), images.paths[j].as_posix()),
                similarity=round(score, 4), embedding_similarity=round(float(
                    embedding[i, j]), 4),
                cross_split=bool(split_of[i] != split_of[j]),
                cross_class=bool(images.labels[i] != images.labels[j]),
                splits=(str(split_of[i]), str(split_of[j])),
                labels=(names[images.labels[i]], names[images.labels[j]])))
    return tuple(sorted(pairs, key=lambda p: -p.similarity))


def outliers(images: ImageSet, features: np.ndarray,
             split_of: np.ndarray) -> tuple[Outlier, ...]:
    """Images beyond the Tukey fence of distances to their own class's centre that are no
    nearer to any other class's centre: far from everything, not merely mislabelled."""
    names = images.class_names
    unit = normalise(features)
    present = np.unique(images.labels)
    centres = np.zeros((len(names), unit.shape[1]))
    for c in present:
        centre = unit[images.labels == c].mean(axis=0)
        centres[c] = centre / max(np.linalg.norm(centre), 1e-12)
    distance = 1 - unit @ centres.T  # cosine distance to each class's centre
    distance[:, np.setdiff1d(np.arange(len(names)), present)] = np.inf
    own = distance[np.arange(len(unit)), images.labels]
    q1, q3 = np.percentile(own, [25, 75])
    fence = q3 + OUTLIER_FENCE * (q3 - q1)
    others = distance.copy()
    others[np.arange(len(unit)), images.labels] = np.inf
    nearest = others.argmin(axis=1)
    found = [Outlier(path=images.paths[i].as_posix(), label=names[images.labels[i]],
                     distance_to_class=round(float(own[i]), 4),
                     nearest_other_class=names[nearest[i]],
                     distance_to_other=round(float(others[i, nearest[i]]), 4),
                     split=str(split_of[i]))
             for i in np.flatnonzero((own > fence) & (others.min(axis=1) > fence))]
    return tuple(sorted(found, key=lambda o: -o.distance_to_class))


def _write(config: AuditConfig, result: AuditResult, images: ImageSet, features: np.ndarray,
           split_of: np.ndarray, probabilities: np.ndarray, skipped: Any) -> None:
    """audit.json and report.html, built in a fresh folder that replaces the output whole."""
    config.output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{config.output.name}.", dir=config.output.parent
                                     ) as tmp:
        folder = Path(tmp) / "audit"
        folder.mkdir()
        write_json(folder / AUDIT_FILE, {
            "data": str(config.data.data_dir), "base": config.base, "weights": config.weights,
            "images": result.images, "class_names": list(images.class_names),
            "out_of_fold_accuracy": round(result.oof_accuracy, 4),
            "thresholds": {"duplicate_similarity": config.duplicate_similarity,
                           "outlier_fence_iqr": OUTLIER_FENCE},
            "label_issues": [asdict(i) for i in result.label_issues],
            "near_duplicates": [asdict(p) for p in result.near_duplicates],
            "outliers": [asdict(o) for o in result.outliers],
            "label_quality": [{"path": p, "score": q} for p, q in result.label_quality],
            "skipped": [{"path": str(f.path), "reason": f.reason} for f in skipped],
            "seconds": round(result.seconds, 2)})
        write_text(folder / REPORT_FILE, _page(config, result, images, features, split_of))
        replace_path(folder, config.output)


SHOWN = 40  # rows per section of the page; audit.json lists all


def _more(n: int) -> str:
    return f" The first {SHOWN} of {n} are shown; audit.json lists all." if n > SHOWN else ""


def _issue_section(result: AuditResult, source: dict[str, str]) -> str:
    rows = [[report.thumbnail(source[i.path]), f"<span class=\"path\">{report.esc(i.path)}"
             f"</span>", report.esc(i.given), report.esc(i.suggested), f"{i.score:.3f}",
             report.esc(i.split)] for i in result.label_issues[:SHOWN]]
    return report.section(
        "Likely label errors", report.table(
            ["image", "path", "given", "suggested", "label quality", "split"], rows,
            [False, False, False, False, True, False]) if rows else "<p>None found.</p>",
        note="Out-of-fold probabilities of a cross-validated linear probe, through cleanlab's "
             "confident learning; lowest label quality first." + _more(
                 len(result.label_issues)))


def _duplicate_section(config: AuditConfig, result: AuditResult,
                       source: dict[str, str]) -> str:
    rows = [[report.thumbnail(source[p.paths[0]]), report.thumbnail(source[p.paths[1]]),
             "<br>".join(f"<span class=\"path\">{report.esc(x)}</span> ({report.esc(s)}, "
                         f"{report.esc(c)})" for x, s, c in zip(p.paths, p.splits, p.labels,
                                                                  strict=True)),
             f"{p.similarity:.3f}", f"{p.embedding_similarity:.3f}",
             "<b class=\"bad\">yes</b>" if p.cross_split else "no",
             "<b class=\"bad\">yes</b>" if p.cross_class else "no"]
            for p in result.near_duplicates[:SHOWN]]
    return report.section(
        "Near-duplicates", report.table(
            ["a", "b", "paths (split, label)", "perceptual", "embedding", "cross split",
             "cross class"], rows, [False, False, False, True, True, False, False])
        if rows else "<p>None found.</p>",
        note=f"Perceptual similarity (correlation of blurred grey thumbnails, the best over "
             f"crops of up to 10 %) of at least {config.duplicate_similarity}; the embedding "
             f"column is the base's cosine similarity, for reference. A pair across splits "
             f"leaks a validation or test image into training." + _more(
                 len(result.near_duplicates)))


def _outlier_section(result: AuditResult, source: dict[str, str]) -> str:
    rows = [[report.thumbnail(source[o.path]), f"<span class=\"path\">{report.esc(o.path)}"
             f"</span>", report.esc(o.label), f"{o.distance_to_class:.3f}",
             report.esc(o.nearest_other_class), f"{o.distance_to_other:.3f}"]
            for o in result.outliers[:SHOWN]]
    return report.section(
        "Outliers", report.table(
            ["image", "path", "label", "distance to its class", "nearest other class",
             "distance to it"], rows, [False, False, False, True, False, True])
        if rows else "<p>None found.</p>",
        note="Beyond the Tukey fence (Q3 + 1.5 IQR) of cosine distances to their own class's "
             "centre, and as far from every other class's.")


def _map_section(result: AuditResult, images: ImageSet, features: np.ndarray,
                 split_of: np.ndarray) -> str:
    index = {p.as_posix(): i for i, p in enumerate(images.paths)}
    points = report.projected(features)
    marked = [index[i.path] for i in result.label_issues[:SHOWN]]
    titles = [f"{p.as_posix()} ({images.class_names[label]}, {s})"
              for p, label, s in zip(images.paths, images.labels, split_of, strict=True)]
    return report.section(
        "Embedding map", report.scatter(points, images.labels, images.class_names, titles,
                                        marked),
        note="The features projected on their first two principal components, coloured by "
             "given label; red rings mark likely label errors. Hover a point for its path.")


def _page(config: AuditConfig, result: AuditResult, images: ImageSet, features: np.ndarray,
          split_of: np.ndarray) -> str:
    source = dict(zip((p.as_posix() for p in images.paths), images.sources, strict=True))
    leaks = sum(p.cross_split for p in result.near_duplicates)
    summary = report.table(
        ["check", "found"],
        [["likely wrong labels (confident learning)", str(len(result.label_issues))],
         ["near-duplicate pairs", str(len(result.near_duplicates))],
         ["... of which cross splits (a leak)", f"<b class=\"bad\">{leaks}</b>" if leaks
          else "0"],
         ["outliers", str(len(result.outliers))],
         ["out-of-fold accuracy of a linear probe", f"{result.oof_accuracy:.3f}"]],
        [False, True])
    return report.page(
        f"Data audit: {config.data.data_dir}",
        f"{result.images} images, {len(images.class_names)} classes, features of "
        f"{config.base} ({config.weights}); audited in {result.seconds:.1f} s. Nothing was "
        f"moved or edited.",
        [report.section("Summary", summary), _issue_section(result, source),
         _duplicate_section(config, result, source), _outlier_section(result, source),
         _map_section(result, images, features, split_of)])
