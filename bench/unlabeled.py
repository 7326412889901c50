"""`finetune --unlabeled`: what class-balanced self-training of the probe
(training/candidates/self_trained.py) gains over the same labels without the pool, and what
the run keeps.

For each set, labelled count per class and seed: that many images per class of train + val
are labelled (a fifth of them, at least one per class, is the val split that chooses, as in
a run), every other train + val image is the unlabelled pool, and the set's test split
scores. A second pool adds images of another set (photos) as a fifth of it: images of no
known class. Reported (test accuracy, mean ± sd over seeds): the probe on the labels alone;
the self-trained probe; and the model the run keeps, by the paired rule on val
(training.choice), which is never the self-trained one unless it beats the probe there by
more than noise.

    python ../shared/bench/make_datasets.py --out /tmp/tk-data digits digits_full tuxpaint10 photos
    python bench/unlabeled.py --sets digits digits_full tuxpaint10 --per-class 5 10
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import transferkit  # noqa: F401  (sets the Keras backend)

BASE = "efficientnet_lite0"


def features(data: Path) -> tuple:
    from transferkit.config import DataConfig
    from transferkit.data.folders import load_splits
    from transferkit.features import base_features
    from transferkit.reporting import NullReporter

    config = DataConfig(data_dir=data)
    splits = load_splits(data, config.val_split, config.seed)
    labelled = splits.train.join(splits.val)
    x = base_features(BASE, "imagenet", config, labelled, NullReporter())
    test = splits.test if splits.test is not None and len(splits.test) else None
    x_test = base_features(BASE, "imagenet", config, test, NullReporter()) if test else None
    return x, labelled.labels, x_test, test.labels if test else None, len(splits.class_names)


def pick_labels(y: np.ndarray, k: int, per: int, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of `per` labelled images a class, drawn by `rng`, split train / val (a fifth, at
    least one per class), and the rows of every other image (the pool)."""
    picked = [rng.choice(np.flatnonzero(y == c), per, replace=False) for c in range(k)]
    n_val = max(1, round(0.2 * per))
    train = np.concatenate([p[n_val:] for p in picked])
    val = np.concatenate([p[:n_val] for p in picked])
    return train, val, np.setdiff1d(np.arange(len(y)), np.concatenate(picked))


def one(x, y, x_test, y_test, k, per, seed, unrelated) -> dict:
    from transferkit.training.candidates.self_trained import self_train
    from transferkit.training.choice import choose
    from transferkit.training.probe import fit_probe

    rng = np.random.default_rng(seed)
    train, val, rows = pick_labels(y, k, per, rng)
    pool = x[rows]
    out = {}
    for name, extra in (("clean pool", None), ("pool + 20 % unrelated", unrelated)):
        x_pool = pool
        if extra is not None:
            n = len(pool) // 4  # a fifth of the polluted pool
            x_pool = np.vstack([pool, extra[rng.choice(len(extra), n, replace=n > len(extra))]])
        probe = fit_probe(x[train], y[train], k, seed=seed)
        trained = self_train(probe, x[train], y[train], x[val], x_pool, k, seed=seed)
        right = {m: p.probabilities(x[val]).argmax(1) == y[val]
                 for m, p in (("probe", probe), ("self-trained", trained.probe))}
        kept = choose(right).kept
        test = {m: float((p.probabilities(x_test).argmax(1) == y_test).mean())
                for m, p in (("probe", probe), ("self-trained", trained.probe))}
        out[name] = {**test, "kept": test[kept], "kept_model": kept,
                     "pseudo": trained.pseudo_labelled, "unlike": trained.unlike,
                     "seconds": trained.seconds, "pool": len(x_pool)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/tk-data"))
    parser.add_argument("--sets", nargs="+", default=["digits", "digits_full", "tuxpaint10"])
    parser.add_argument("--per-class", nargs="+", type=int, default=[5, 10])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--unrelated", default="photos")
    parser.add_argument("--results", type=Path)
    args = parser.parse_args()
    unrelated = features(args.data / args.unrelated)[0]
    rows = []
    print("| set | labels per class | pool | probe | self-trained | kept by the rule | "
          "kept self-trained | pseudo-labelled | kept out as unlike |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.sets:
        x, y, x_test, y_test, k = features(args.data / name)
        for per in args.per_class:
            runs = [one(x, y, x_test, y_test, k, per, s, unrelated) for s in args.seeds]
            for pool in runs[0]:
                r = [run[pool] for run in runs]
                cell = {m: f"{np.mean([a[m] for a in r]):.3f} ± {np.std([a[m] for a in r]):.3f}"
                        for m in ("probe", "self-trained", "kept")}
                rows.append({"set": name, "per_class": per, "pool": pool, "runs": r})
                print(f"| {name} | {per} | {pool} ({r[0]['pool']}) | {cell['probe']} | "
                      f"{cell['self-trained']} | {cell['kept']} | "
                      f"{sum(a['kept_model'] == 'self-trained' for a in r)}/{len(r)} | "
                      f"{np.mean([a['pseudo'] for a in r]):.0f} | "
                      f"{np.mean([a['unlike'] for a in r]):.0f} |")
    if args.results:
        args.results.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
