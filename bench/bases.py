"""The offline bases side by side: what a linear probe on each one's frozen features scores on
held-out data, what `bases --rank` chooses and what it costs, and what refitting the probe on
train + val and combining bases add. One run, the same splits for every row.

For each set and base (EfficientNet-Lite0, 1, 2 at their own resolutions):
- features: seconds to compute them from a cold cache (then cached for the rows below);
- probe: logistic regression, C by 5-fold CV on train (transferkit's fit_probe), scored on
  test (or val when the set has no test split);
- refit: the same C fitted again on train + val, scored on test (sets with a test split);
- rank: `bases --rank`'s cross-validated accuracy over train + val, its choice, and its
  seconds with every feature cached.
A last row per set, "concat", is the probe on the three bases' features side by side.

    python ../shared/bench/make_datasets.py --out /tmp/tk-data tuxpaint10 digits digits_full photos
    python bench/bases.py --sets tuxpaint10 digits digits_full photos
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import transferkit  # noqa: F401  (sets the Keras backend)

BASES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def one_set(data: Path, seed: int) -> list[dict]:
    from transferkit.commands.bases import rank_bases
    from transferkit.config import DataConfig
    from transferkit.data.folders import load_splits
    from transferkit.features import base_features
    from transferkit.reporting import NullReporter
    from transferkit.training.probe import fit_probe, probe_estimator, sklearn_fits

    config = DataConfig(data_dir=data, seed=seed)
    splits = load_splits(data, config.val_split, seed)
    held = splits.test if splits.test is not None and len(splits.test) else splits.val
    k = len(splits.class_names)
    rows, kept = [], {}
    for base in BASES:
        start = time.perf_counter()
        x = {name: base_features(base, "imagenet", config, images, NullReporter())
             for name, images in (("train", splits.train), ("val", splits.val), ("held", held))}
        rows.append({"set": data.name, "base": base, "features_s": time.perf_counter() - start})
        kept[base] = x
    x = {"concat": {s: np.hstack([kept[b][s] for b in BASES]) for s in ("train", "val", "held")},
         **kept}
    concat = {"set": data.name, "base": "concat"}
    for row in [*rows, concat]:
        f = x[row["base"]]
        start = time.perf_counter()
        probe = fit_probe(f["train"], splits.train.labels, k, seed=seed)
        row["probe_s"] = time.perf_counter() - start
        row["probe"] = float((probe.probabilities(f["held"]).argmax(1) == held.labels).mean())
        if held is not splits.val:
            with sklearn_fits():
                refit = probe_estimator(probe.c).fit(np.vstack([f["train"], f["val"]]),
                                                     np.r_[splits.train.labels, splits.val.labels])
            row["refit"] = float((refit.predict(f["held"]) == held.labels).mean())
        row["scored_on"] = "test" if held is not splits.val else "val"
    start = time.perf_counter()
    ranking = rank_bases(config)
    seconds = time.perf_counter() - start
    for row in rows:
        rank = next(r for r in ranking.ranks if r.base == row["base"])
        row.update(rank_cv=rank.score.accuracy, chosen=ranking.best == row["base"],
                   rank_s=seconds)
    return [*rows, concat]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/tmp/tk-data"))
    parser.add_argument("--sets", nargs="+", default=["tuxpaint10", "digits", "digits_full"])
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--out", type=Path, default=Path("bench-bases.json"))
    args = parser.parse_args()
    rows = [row for name in args.sets for row in one_set(args.data / name, args.seed)]
    args.out.write_text(json.dumps(rows, indent=1))
    print(f"{'set':12s} {'base':19s} {'feat s':>7s} {'probe':>6s} {'refit':>6s} "
          f"{'rank cv':>7s} {'chosen':>6s} {'rank s':>6s} {'probe s':>7s}")
    for r in rows:
        print(f"{r['set']:12s} {r['base']:19s} {r.get('features_s', 0):7.1f} "
              f"{r['probe']:6.3f} {r.get('refit', float('nan')):6.3f} "
              f"{r.get('rank_cv', float('nan')):7.3f} {str(r.get('chosen', '')):>6s} "
              f"{r.get('rank_s', 0):6.1f} {r['probe_s']:7.1f}")


if __name__ == "__main__":
    main()
