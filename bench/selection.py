"""Which images to label next: `transferkit select`'s rule against random picks, in
simulated rounds of labelling (the sets' true labels stand in for a person).

For each set and seed: start from a few labelled images per class (drawn from train + val),
put every other train + val image in the pool, and run rounds: pick N pool images (select's
`choose` on the cached Lite0 features, or uniformly at random), label them, and score a
logistic-regression probe on everything labelled so far (C = 1 on the pooled features, one
C for every round so that only the labels differ) on the set's test split. Reported: the
test accuracy after each round (mean over seeds), and the labels each side needed to reach
95 % of the accuracy with every label.

    python ../shared/bench/make_datasets.py --out /tmp/tk-data tuxpaint10 digits_full
    python bench/selection.py --sets digits_full tuxpaint10 --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import transferkit  # noqa: F401  (sets the Keras backend)

BASE = "efficientnet_lite0"


def simulate(data: Path, seeds: list[int], start: int, n: int, rounds: int) -> dict:
    from transferkit.commands.select import choose
    from transferkit.config import DataConfig
    from transferkit.data.folders import load_splits
    from transferkit.features import base_features
    from transferkit.reporting import NullReporter
    from transferkit.training.probe import probe_estimator, sklearn_fits

    config = DataConfig(data_dir=data)
    splits = load_splits(data, config.val_split, config.seed)
    labelled_set = splits.train.join(splits.val)
    x = base_features(BASE, "imagenet", config, labelled_set, NullReporter())
    x_test = base_features(BASE, "imagenet", config, splits.test, NullReporter())
    y, y_test, k = labelled_set.labels, splits.test.labels, len(splits.class_names)

    def accuracy(rows: np.ndarray) -> float:
        with sklearn_fits():
            model = probe_estimator(1.0).fit(x[rows], y[rows])
        return float((model.predict(x_test) == y_test).mean())

    full = accuracy(np.arange(len(x)))
    curves: dict[str, list[list[float]]] = {"random": [], "select": []}
    seconds = {"random": 0.0, "select": 0.0}
    for seed in seeds:
        rng = np.random.default_rng(seed)
        first = np.concatenate([rng.choice(np.flatnonzero(y == c), start, replace=False)
                                for c in range(k)])
        for side in curves:
            rows, curve = first.copy(), [accuracy(first)]
            for _ in range(rounds):
                pool = np.setdiff1d(np.arange(len(x)), rows)
                began = time.perf_counter()
                if side == "random":
                    new = rng.choice(pool, min(n, len(pool)), replace=False)
                else:
                    picked, *_ = choose(x[rows], y[rows], k, x[pool], n, seed)
                    new = pool[picked]
                seconds[side] += time.perf_counter() - began
                rows = np.concatenate([rows, new])
                curve.append(accuracy(rows))
            curves[side].append(curve)
    labels = [len(first) + r * n for r in range(rounds + 1)]
    out = {"set": data.name, "all_labels": len(x), "full_accuracy": full, "labels": labels}
    for side, runs in curves.items():
        mean = np.mean(runs, axis=0)
        out[side] = {"mean": mean.tolist(), "sd": np.std(runs, axis=0).tolist(),
                     "seconds_per_round": seconds[side] / (rounds * len(seeds)),
                     "reach_95": next((n_ for n_, a in zip(labels, mean, strict=True)
                                       if a >= 0.95 * full), None)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/tk-data"))
    parser.add_argument("--sets", nargs="+", default=["digits_full", "tuxpaint10"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--start", type=int, default=3, help="labelled images per class")
    parser.add_argument("--n", type=int, default=20, help="labels per round")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--results", type=Path)
    args = parser.parse_args()
    results = [simulate(args.data / s, args.seeds, args.start, args.n, args.rounds)
               for s in args.sets]
    if args.results:
        args.results.write_text(json.dumps(results, indent=2))
    for r in results:
        print(f"\n{r['set']}: {r['all_labels']} labels in all, test accuracy with all "
              f"{r['full_accuracy']:.3f}; 95 % of it: {0.95 * r['full_accuracy']:.3f}")
        print("| labels | " + " | ".join(str(n) for n in r["labels"]) + " |")
        print("|---" * (len(r["labels"]) + 1) + "|")
        for side in ("random", "select"):
            print(f"| {side} | " + " | ".join(f"{m:.3f}" for m in r[side]["mean"]) + " |")
        for side in ("random", "select"):
            print(f"{side}: reaches 95 % at {r[side]['reach_95']} labels; "
                  f"{r[side]['seconds_per_round']:.2f} s per round")


if __name__ == "__main__":
    main()
