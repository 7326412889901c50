""""None of these": how well transferkit's novelty score tells images of classes it never saw
from images of the classes it knows, against the top probability alone.

For each set and seed, a third of the classes (at least one) are held out as unknown. A
linear probe (transferkit's fit_probe) is trained on the known classes' train split (frozen
Lite0 features, cached), the novelty score is fitted on their val split (its scale and its
threshold at 95 % of known images accepted), and scored on:
- known: the known classes' test split (sets without one: half of val, the other half fits);
- unknown: every val and test image of the held-out classes (never seen in any way).
Reported per score: AUROC (known vs unknown) and the false-accept rate of unknown images at
the threshold val set (what `predict --reject-unknown` would let through), with the share of
known test images accepted there.

    python ../shared/bench/make_datasets.py --out /tmp/tk-data tuxpaint10 photos digits
    python bench/novelty.py --sets tuxpaint10 photos digits --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import transferkit  # noqa: F401  (sets the Keras backend)

BASE = "efficientnet_lite0"


def auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    """P(an unknown image scores above a known one), ties counted half."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(len(known)), np.ones(len(unknown))],
                               np.r_[known, unknown]))


def one_run(data: Path, seed: int, ks: tuple[int, ...]) -> list[dict]:
    from transferkit.config import DataConfig
    from transferkit.data.folders import load_splits
    from transferkit.features import base_features
    from transferkit.novelty import fit_novelty
    from transferkit.reporting import NullReporter
    from transferkit.training.probe import fit_probe

    config = DataConfig(data_dir=data)
    splits = load_splits(data, config.val_split, config.seed)
    parts = {"train": splits.train, "val": splits.val}
    if splits.test is not None and len(splits.test):
        parts["test"] = splits.test
    x = {name: base_features(BASE, "imagenet", config, images, NullReporter())
         for name, images in parts.items()}
    y = {name: images.labels for name, images in parts.items()}
    rng = np.random.default_rng(seed)
    k = len(splits.class_names)
    unknown_classes = rng.choice(k, max(1, k // 3), replace=False)
    known = np.setdiff1d(np.arange(k), unknown_classes)
    remap = {c: i for i, c in enumerate(known)}

    def take(name: str, keep_known: bool) -> tuple[np.ndarray, np.ndarray]:
        mask = np.isin(y[name], known) == keep_known
        return x[name][mask], np.array([remap.get(c, -1) for c in y[name][mask]])

    x_train, y_train = take("train", True)
    x_fit, _ = take("val", True)
    if "test" in parts:
        x_known, _ = take("test", True)
    else:  # half of val fits the score, the other half is scored
        order = rng.permutation(len(x_fit))
        x_known, x_fit = x_fit[order[: len(order) // 2]], x_fit[order[len(order) // 2:]]
    x_unknown = np.vstack([take(name, False)[0] for name in parts if name != "train"])
    probe = fit_probe(x_train, y_train, len(known), seed=seed)
    rows = []
    for kk in ks:
        novelty = fit_novelty(x_train, x_fit, probe.probabilities(x_fit), seed=seed, k=kk)
        scores: dict[str, dict[str, np.ndarray]] = {}
        for name, feats in (("fit", x_fit), ("known", x_known), ("unknown", x_unknown)):
            p = probe.probabilities(feats)
            z = (novelty.parts(feats, p) - novelty.centre) / novelty.spread
            scores[name] = {"max-softmax": z[:, 1], f"k-NN distance, k={kk}": z[:, 0],
                            f"novelty (transferkit), k={kk}": novelty.score(feats, p)}
        for score in scores["known"]:
            if score == "max-softmax" and kk != ks[0]:
                continue
            threshold = np.quantile(scores["fit"][score], 0.95, method="higher")
            rows.append({"set": data.name, "seed": seed, "score": score,
                         "unknown_classes": [splits.class_names[c] for c in unknown_classes],
                         "auroc": auroc(scores["known"][score], scores["unknown"][score]),
                         "false_accept": float((scores["unknown"][score] <= threshold).mean()),
                         "known_accepted": float((scores["known"][score] <= threshold).mean()),
                         "known": len(x_known), "unknown": len(x_unknown)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/tk-data"))
    parser.add_argument("--sets", nargs="+", default=["tuxpaint10", "photos", "digits"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--k", nargs="+", type=int, default=[1, 5])
    parser.add_argument("--results", type=Path)
    args = parser.parse_args()
    rows = [row for name in args.sets for seed in args.seeds
            for row in one_run(args.data / name, seed, tuple(args.k))]
    if args.results:
        args.results.write_text(json.dumps(rows, indent=2))
    print("| set | score | AUROC, mean ± sd | false accepts at 95 % known | known accepted |")
    print("|---|---|---|---|---|")
    for name in args.sets:
        for score in dict.fromkeys(r["score"] for r in rows if r["set"] == name):
            mine = [r for r in rows if r["set"] == name and r["score"] == score]
            a = np.array([r["auroc"] for r in mine])
            fa = np.mean([r["false_accept"] for r in mine])
            ka = np.mean([r["known_accepted"] for r in mine])
            print(f"| {name} | {score} | {a.mean():.3f} ± {a.std():.3f} | {fa:.3f} | {ka:.3f} |")


if __name__ == "__main__":
    main()
