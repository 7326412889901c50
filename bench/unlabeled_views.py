"""`--unlabeled` routes that use augmentation, on frozen features (issue 35): does a probe fed
augmented views, or a noisy student (FixMatch's idea on a frozen base: the teacher labels
each pool image from its plain view, the student learns those labels from augmented views),
gain +3 points at 5 labels a class where self-training on plain features did not?

Per set: V augmented views of every train + val image (transferkit's default augmentation,
one warp, seeded) through Lite0's frozen pooled features, beside the plain features. Per seed,
as bench/unlabeled.py: 5 labels per class (a fifth of them val), the rest of train + val the
pool, the test split scores. Methods (C fixed at the plain probe's cross-validated C, since
views of one image would leak across the folds):
  probe        the probe on the labels' plain features (what a run without a pool fits);
  views        the same labels, plain and augmented views;
  student      views, plus the pool's class-balanced surest answers (as self_trained.py:
               ROUNDS rounds of SHARE of the pool), labelled from the plain view by the
               round's model and learnt from the plain view and every augmented view.

    python bench/unlabeled_views.py --sets digits tuxpaint10 digits_full openclipart10
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

import transferkit  # noqa: F401  (sets the Keras backend)

BASE = "efficientnet_lite0"


def view_features(data: Path, views: int, flips: bool) -> tuple:
    from transferkit.augment import build_augmentation
    from transferkit.bases import get_base, resolve_image_size
    from transferkit.config import AugmentConfig, DataConfig
    from transferkit.data.folders import load_splits
    from transferkit.data.pipeline import build_dataset
    from transferkit.features import FeatureModel, base_features
    from transferkit.reporting import NullReporter

    config = DataConfig(data_dir=data)
    splits = load_splits(data, config.val_split, config.seed)
    labelled = splits.train.join(splits.val)
    x = base_features(BASE, "imagenet", config, labelled, NullReporter())
    x_test = base_features(BASE, "imagenet", config, splits.test, NullReporter())
    spec = get_base(BASE)
    size = resolve_image_size(spec, config.image_size)
    model = FeatureModel(BASE, "imagenet", 0, size, "float32", len(spec.blocks)).build()
    augmented = []
    for v in range(views):
        ds = build_dataset(labelled.sources, None, size, 32,
                           augment=build_augmentation(AugmentConfig(horizontal_flip=flips),
                                                      seed=100 + v))
        augmented.append(model.predict(ds, verbose=0))
    return (x, np.stack(augmented), labelled.labels, x_test, splits.test.labels,
            len(splits.class_names))


def fit(x: np.ndarray, y: np.ndarray, c: float) -> Any:
    """The probe's logistic regression at C = c, fitted."""
    from transferkit.training.probe import probe_estimator, sklearn_fits

    with sklearn_fits():
        model = probe_estimator(c).fit(x, y)
    return model


def one(data: tuple, per: int, seed: int) -> dict[str, float]:
    from unlabeled import pick_labels  # bench/, beside this script

    from transferkit.training.candidates.self_trained import ROUNDS, SHARE
    from transferkit.training.probe import fit_probe

    x, aug, y, x_test, y_test, k = data
    train, _, pool = pick_labels(y, k, per, np.random.default_rng(seed))
    probe = fit_probe(x[train], y[train], k, seed=seed)
    c = probe.c

    def with_views(rows: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (np.vstack([x[rows], *aug[:, rows]]), np.tile(labels, 1 + len(aug)))

    def score(model) -> float:
        return float((model.predict(x_test) == y_test).mean())

    out = {"probe": float((probe.probabilities(x_test).argmax(1) == y_test).mean())}
    views = fit(*with_views(train, y[train]), c)
    out["views"] = score(views)
    model, per_round = views, int(SHARE * len(pool) / k)
    for round_ in range(1, ROUNDS + 1):
        p = model.predict_proba(x[pool])
        answers = model.classes_[p.argmax(1)]
        chosen = np.concatenate([
            members[np.argsort(-p[members].max(1), kind="stable")[:per_round * round_]]
            for c_ in range(k) for members in [np.flatnonzero(answers == c_)]])
        rows = np.r_[train, pool[chosen]]
        model = fit(*with_views(rows, np.r_[y[train], answers[chosen]]), c)
    out["student"] = score(model)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/tk-data"))
    parser.add_argument("--sets", nargs="+", default=["digits", "tuxpaint10", "digits_full"])
    parser.add_argument("--per-class", type=int, default=5)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--no-flips", nargs="*", default=["digits", "digits_full"],
                        help="sets whose views are not mirrored (a run's data checks turn "
                             "flips off where mirroring changes the label)")
    args = parser.parse_args()
    print("| set | labels per class | probe | views | student (views + pool) | gain | "
          "seconds (features + fits) |")
    print("|---|---|---|---|---|---|---|")
    for name in args.sets:
        started = time.perf_counter()
        data = view_features(args.data / name, args.views, name not in args.no_flips)
        runs = [one(data, args.per_class, s) for s in args.seeds]
        cell = {m: f"{np.mean([r[m] for r in runs]):.3f} ± {np.std([r[m] for r in runs]):.3f}"
                for m in runs[0]}
        gain = np.mean([r["student"] - r["probe"] for r in runs])
        print(f"| {name} | {args.per_class} | {cell['probe']} | {cell['views']} | "
              f"{cell['student']} | {100 * gain:+.1f} | {time.perf_counter() - started:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
