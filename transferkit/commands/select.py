"""`transferkit select`: which images of an unlabelled pool to label next.

From the frozen-base features (cached) of the labelled data and of the pool:
1. a linear probe on every labelled image (train and val) gives each pool image class
   probabilities; its uncertainty is 1 - (top probability - the second), the margin;
2. pool images that copy a labelled image (identical content, or centred features at cosine
   similarity DUPLICATE or more) would teach nothing, and images far from every class (beyond
   Tukey's far-out fence on the pool's distances to the nearest class centre) are likely
   junk: both are left out, and counted;
3. the rest is clustered into N groups (k-means on the centred, normalised features) and each
   group's most uncertain image is picked, skipping near-copies of earlier picks: uncertain,
   but spread over the pool (Citovsky et al. 2021's cluster-margin, one cluster per label);
4. picks the novelty score calls unlike every labelled class (off-task images that passed
   the fence) are flagged and listed last.

bench/selection.py measured it against random picks, the margin alone and Typiclust, in rounds
of labelling on digits_full and tuxpaint10 (bench/README.md). Nothing in DATA or POOL is ever
moved or written.
"""

from __future__ import annotations

import csv
import io
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferkit.config import SelectConfig
from transferkit.data.folders import ImageSet, load_splits, read_pool
from transferkit.features import base_features, normalise
from transferkit.files import check_outside, write_text
from transferkit.novelty import fit_novelty
from transferkit.reporting import NullReporter, Reporter
from transferkit.reports import html as report
from transferkit.runs.directory import check_output
from transferkit.training.probe import fit_probe

DUPLICATE = 0.98  # cosine similarity of features from which two images are near-copies
FENCE = 3.0  # Tukey's "far out": beyond Q3 + 3 IQR of the pool's distances to the nearest
# class centre (the audit's 1.5 would also leave out unusual images worth labelling)


@dataclass(frozen=True)
class Pick:
    path: Path
    score: float  # the probe's uncertainty, 1 - margin: 1 when torn between two classes
    reason: str
    unknown: bool = False  # the novelty score calls it unlike every labelled class


@dataclass(frozen=True)
class Selection:
    picks: tuple[Pick, ...]
    pool: int  # readable pool images
    unreadable: tuple[tuple[Path, str], ...]
    labelled_copies: int  # pool images already labelled (same content or features)
    outliers: int  # pool images far from every class, left out as likely junk
    unknown: int  # picks the novelty score calls unlike every class, listed last
    output: Path
    html: Path | None
    seconds: float


def far_from_every_class(labelled: np.ndarray, labels: np.ndarray, pool: np.ndarray
                         ) -> np.ndarray:
    """Which pool rows stand out from the pool by their (cosine) distance to the nearest
    class centre: beyond Q3 + 3 IQR of the pool's own distances. Judged against the pool, not
    the labelled images, whose spread a few labels per class cannot estimate."""
    classes = np.unique(labels)
    centres = normalise(np.stack([labelled[labels == c].mean(axis=0) for c in classes]))
    nearest = 1 - (pool @ centres.T).max(axis=1)
    q1, q3 = np.percentile(nearest, [25, 75])
    return nearest > q3 + FENCE * (q3 - q1)


def choose(labelled: np.ndarray, labels: np.ndarray, num_classes: int, pool: np.ndarray,
           n: int, seed: int = 0
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, int]]:
    """The pool rows to label next, best first, with their uncertainty, the probe's
    probabilities for them and the size of the cluster each stands for; and how many rows
    were left out, by why.

    `labelled` and `pool` are feature rows; `labels` index `num_classes` classes."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    probabilities = fit_probe(normalise(labelled), labels, num_classes, seed=seed).probabilities(
        normalise(pool))
    far = far_from_every_class(normalise(labelled), labels, normalise(pool))
    # Similarities and clusters on centred features: pooled ReLU features share a large
    # positive component that makes any two images look alike.
    centre = np.vstack([labelled, pool]).mean(axis=0)
    labelled, pool = normalise(labelled - centre), normalise(pool - centre)
    top2 = np.sort(probabilities, axis=1)[:, -2:]
    uncertainty = 1 - (top2[:, 1] - top2[:, 0])
    copies = np.zeros(len(pool), bool)
    for start in range(0, len(pool), 1024):  # bounded memory for any pool
        copies[start:start + 1024] = (pool[start:start + 1024] @ labelled.T).max(
            axis=1) >= DUPLICATE
    outliers = far & ~copies
    candidates = np.flatnonzero(~copies & ~outliers)
    left_out = {"copies": int(copies.sum()), "outliers": int(outliers.sum())}
    if len(candidates) == 0 or n == 0:
        return np.zeros(0, int), np.zeros(0), probabilities[:0], np.zeros(0, int), left_out
    groups = min(n, len(candidates))
    with warnings.catch_warnings():  # identical candidates make fewer distinct clusters
        warnings.simplefilter("ignore", ConvergenceWarning)
        clusters = KMeans(groups, n_init=1, random_state=seed).fit_predict(pool[candidates])
    ranked = candidates[np.argsort(-uncertainty[candidates], kind="stable")]
    picked: list[int] = []
    taken: set[int] = set()
    cluster_of = dict(zip(candidates.tolist(), clusters.tolist(), strict=True))
    for row in ranked:  # each cluster's most uncertain image, most uncertain cluster first
        if cluster_of[row] in taken or (picked and (pool[picked] @ pool[row]).max() >= DUPLICATE):
            continue
        picked.append(int(row))
        taken.add(cluster_of[row])
    for row in ranked:  # clusters that held only near-copies: fill up with the most uncertain
        if len(picked) >= n:
            break
        if row not in picked and (pool[picked] @ pool[row]).max() < DUPLICATE:
            picked.append(int(row))
    order = np.array(sorted(picked, key=lambda r: -uncertainty[r]), int)
    sizes = np.bincount(clusters, minlength=groups)[[cluster_of[r] for r in order]]
    return order, uncertainty[order], probabilities[order], sizes, left_out


def _reason(p: np.ndarray, cluster: int, class_names: tuple[str, ...]) -> str:
    first, second = np.argsort(-p, kind="stable")[:2]
    return (f"the probe says '{class_names[first]}' {p[first]:.2f}, "
            f"'{class_names[second]}' {p[second]:.2f}; the least sure of a group of "
            f"{cluster} similar pool image(s)")


def select(config: SelectConfig, reporter: Reporter | None = None) -> Selection:
    """Picks `config.n` pool images to label next and writes them to `config.output` (CSV:
    path,score,reason,unknown, best first), and an HTML page of them with `config.html`.

    Args:
        config: the labelled data, the pool, how many to pick and the output.
        reporter: where progress goes (none when None).

    Returns:
        The picks, best first, and what was left out of the pool and why.

    Raises:
        TransferkitError: bad data, pool or options, or an existing output.
    """
    reporter = reporter or NullReporter()
    started = time.perf_counter()
    html = config.output.with_suffix(".html") if config.html else None
    for target in (config.output, *([html] if html else [])):
        check_output(target, config.overwrite, data=config.data.data_dir)
        check_outside(target, config.pool, "output file", "pool folder",
                      "the next select would read it as a pool image")
    splits = load_splits(config.data.data_dir, config.data.val_split, config.data.seed,
                         reporter, use_cache=config.cache)
    labelled = splits.train.join(splits.val)
    found = read_pool(config.pool, config.data.data_dir, splits.every_image(), reporter)
    pool, unreadable, same_content = found.images, found.unreadable, found.labelled_copies
    if config.n > len(pool):
        reporter.warning(f"-n {config.n} is more than the pool's {len(pool)} new images: "
                         f"picking from all of them.")
    x = {name: base_features(config.base, config.weights, config.data, images, reporter,
                             config.cache, config.engine)
         for name, images in (("labelled", labelled), ("pool", pool))}
    rows, scores, probabilities, sizes, left_out = choose(
        x["labelled"], labelled.labels, len(splits.class_names), x["pool"], config.n,
        config.data.seed)
    unknown = unlike_every_class(x["labelled"], len(splits.train), labelled.labels,
                                 x["pool"][rows], len(splits.class_names), config.data.seed)
    order = np.argsort(unknown, kind="stable")  # the picks that look off-task go last
    rows = rows[order]
    picks = tuple(Pick(config.pool / pool.paths[r], float(scores[i]),
                       _reason(probabilities[i], int(sizes[i]), splits.class_names)
                       + ("; unlike every labelled class (the novelty score): check that it "
                          "belongs to the task" if unknown[i] else ""), bool(unknown[i]))
                  for r, i in zip(rows, order, strict=True))
    _write_csv(config.output, picks)
    if html is not None:
        _write_html(html, picks, pool, rows, config)
    return Selection(picks, len(pool) + same_content, tuple(unreadable),
                     same_content + left_out["copies"], left_out["outliers"],
                     int(unknown.sum()), config.output, html, time.perf_counter() - started)


def unlike_every_class(labelled: np.ndarray, n_train: int, labels: np.ndarray,
                       picked: np.ndarray, num_classes: int, seed: int = 0) -> np.ndarray:
    """Which picked pool rows the novelty score (novelty.py, fitted as a run fits it: on
    train's features, its threshold passing 95 % of val) calls unlike every labelled class;
    all False when val is too small to set a threshold.

    Args:
        labelled: feature rows of the labelled images, train's first `n_train`, then val's.
        n_train: how many of them are train's.
        labels: their classes.
        picked: feature rows of the picked pool images.
        num_classes: how many classes there are.
        seed: for the probe and the score's sampling.

    Returns:
        One bool per picked row.
    """
    x_train, x_val = labelled[:n_train], labelled[n_train:]
    probe = fit_probe(x_train, labels[:n_train], num_classes, seed=seed)
    novelty = fit_novelty(x_train, x_val, probe.probabilities(x_val), seed=seed)
    if novelty is None or not len(picked):
        return np.zeros(len(picked), bool)
    return novelty.score(picked, probe.probabilities(picked)) > novelty.threshold


def _write_csv(path: Path, picks: tuple[Pick, ...]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "score", "reason", "unknown"])
    writer.writerows([str(p.path), f"{p.score:.4f}", p.reason, int(p.unknown)] for p in picks)
    write_text(path, buffer.getvalue())


def _write_html(path: Path, picks: tuple[Pick, ...], pool: ImageSet, rows: np.ndarray,
                config: SelectConfig) -> None:
    cells = [[report.thumbnail(pool.sources[r]), report.esc(str(p.path)), f"{p.score:.3f}",
              report.esc(p.reason)] for p, r in zip(picks, rows, strict=True)]
    page = report.page(
        "transferkit select", f"{len(picks)} images of {config.pool} to label next, for "
                              f"{config.data.data_dir}",
        [report.section("Label these next, best first", report.table(
            ["image", "path", "uncertainty", "why"], cells),
            note="Uncertainty is 1 - (top probability - second) of a linear probe on the "
                 "labelled images; each pick is the least sure image of its own group "
                 "(k-means) of the pool, so the picks cover the pool instead of one "
                 "confusing corner.")])
    write_text(path, page)
